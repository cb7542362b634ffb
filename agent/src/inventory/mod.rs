//! What this machine offers: CPUs, memory and, through NVML, its NVIDIA GPUs, with their health.
//!
//! Two layers: [`driver`] mirrors NVML calls and returns raw readings; this module decides what
//! they mean (health) and keeps a GPU that stops answering listed, unhealthy. NVML is optional:
//! with no driver (or a library that fails to load) the agent offers CPU only and says why; it
//! never fails to start for lack of a GPU.

pub mod driver;

use std::path::Path;
use std::sync::Mutex;

use driver::{GpuDriver, NvmlDriver, RawGpu};
use gantry_proto::v1;
use tracing::{info, warn};

pub struct Inventory {
    driver: Option<Box<dyn GpuDriver>>,
    base: v1::Inventory,
    /// The GPUs as last read, by index: a GPU that stops answering stays listed, unhealthy.
    last: Mutex<Vec<v1::GpuInfo>>,
}

impl Inventory {
    /// Loads NVML from `lib` (or the system's `libnvidia-ml.so.1`).
    pub fn detect(lib: Option<&Path>) -> Inventory {
        match NvmlDriver::load(lib) {
            Ok(driver) => Inventory::with_driver(Some(Box::new(driver)), String::new()),
            Err(e) => {
                info!(error = %e, "no NVIDIA library: offering CPU only");
                Inventory::with_driver(None, e)
            }
        }
    }

    pub fn with_driver(driver: Option<Box<dyn GpuDriver>>, nvml_error: String) -> Inventory {
        let gpu_driver = driver.as_ref().and_then(|d| d.driver_version()).unwrap_or_default();
        let base = v1::Inventory {
            hostname: hostname(),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: total_memory().unwrap_or(0),
            gpu_driver,
            nvml_error,
            ..Default::default()
        };
        Inventory { driver, base, last: Mutex::new(Vec::new()) }
    }

    /// The current inventory with fresh telemetry and health.
    pub fn read(&self) -> v1::Inventory {
        let mut out = self.base.clone();
        if let Some(driver) = &self.driver {
            let mut last = self.last.lock().expect("inventory lock poisoned");
            out.gpus = read_gpus(driver.as_ref(), &last);
            *last = out.gpus.clone();
        }
        out
    }
}

fn read_gpus(driver: &dyn GpuDriver, last: &[v1::GpuInfo]) -> Vec<v1::GpuInfo> {
    let count = match driver.count() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NVML could not count GPUs");
            return last.iter().map(|g| lost(g, &e)).collect();
        }
    };
    let mut gpus = Vec::new();
    for index in 0..count.max(last.len() as u32) {
        match driver.read(index) {
            Ok(raw) => gpus.push(to_info(index, raw)),
            // A GPU known before that no longer answers (lost, fallen off the bus) stays in the
            // inventory, unhealthy, so nothing more is placed on it and people see why.
            Err(e) => match last.get(index as usize) {
                Some(known) => {
                    warn!(index, uuid = %known.uuid, error = %e, "GPU stopped answering");
                    gpus.push(lost(known, &e));
                }
                None => warn!(index, error = %e, "NVML could not open a GPU"),
            },
        }
    }
    gpus
}

fn lost(known: &v1::GpuInfo, error: &str) -> v1::GpuInfo {
    v1::GpuInfo {
        healthy: false,
        health_reason: format!("NVML: {error}"),
        utilization_percent: None,
        temperature_c: None,
        power_mw: None,
        memory_used_bytes: None,
        sm_clock_mhz: None,
        throttle_reasons: Vec::new(),
        processes: Vec::new(),
        ..known.clone()
    }
}

/// A reading, and whether it is healthy: uncorrectable ECC errors, or a temperature at or above
/// the slowdown threshold, make a GPU unhealthy.
fn to_info(index: u32, raw: RawGpu) -> v1::GpuInfo {
    let mut problems = Vec::new();
    if let Some(n) = raw.ecc_uncorrected.filter(|n| *n > 0) {
        problems.push(format!("{n} uncorrectable ECC errors"));
    }
    if let (Some(t), Some(limit)) = (raw.temperature_c, raw.slowdown_temperature_c)
        && t >= limit
    {
        problems.push(format!("temperature {t}C at or above the slowdown threshold {limit}C"));
    }
    v1::GpuInfo {
        uuid: raw.uuid,
        name: raw.name,
        memory_total_bytes: raw.memory_total_bytes,
        index,
        memory_used_bytes: raw.memory_used_bytes,
        utilization_percent: raw.utilization_percent,
        temperature_c: raw.temperature_c,
        power_mw: raw.power_mw,
        healthy: problems.is_empty(),
        health_reason: problems.join("; "),
        serial: raw.serial.unwrap_or_default(),
        compute_capability: raw.compute_capability.map(|(a, b)| format!("{a}.{b}")).unwrap_or_default(),
        sm_clock_mhz: raw.sm_clock_mhz,
        power_limit_mw: raw.power_limit_mw,
        ecc_uncorrected: raw.ecc_uncorrected,
        slowdown_temperature_c: raw.slowdown_temperature_c,
        pci_bus_id: raw.pci_bus_id.unwrap_or_default(),
        mig_enabled: raw.mig_enabled,
        throttle_reasons: raw.throttle_reasons.unwrap_or_default(),
        numa_node: raw.numa_node,
        processes: raw
            .processes
            .unwrap_or_default()
            .into_iter()
            .map(|(pid, used_memory_bytes)| v1::GpuProcess { pid, used_memory_bytes })
            .collect(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings by index, changeable by the test; `None` is a GPU that does not answer.
    struct Fake(std::sync::Arc<Mutex<Vec<Option<RawGpu>>>>);

    impl GpuDriver for Fake {
        fn driver_version(&self) -> Option<String> {
            Some("fake".into())
        }
        fn count(&self) -> Result<u32, String> {
            Ok(self.0.lock().unwrap().len() as u32)
        }
        fn read(&self, index: u32) -> Result<RawGpu, String> {
            self.0.lock().unwrap()[index as usize].clone().ok_or_else(|| "GPU is lost".to_string())
        }
    }

    fn gpu(uuid: &str) -> RawGpu {
        RawGpu {
            uuid: uuid.into(),
            name: "NVIDIA H100".into(),
            memory_total_bytes: 80 << 30,
            temperature_c: Some(50),
            slowdown_temperature_c: Some(88),
            ecc_uncorrected: Some(0),
            compute_capability: Some((9, 0)),
            ..RawGpu::default()
        }
    }

    fn inventory(gpus: Vec<Option<RawGpu>>) -> (Inventory, std::sync::Arc<Mutex<Vec<Option<RawGpu>>>>) {
        let shared = std::sync::Arc::new(Mutex::new(gpus));
        (Inventory::with_driver(Some(Box::new(Fake(shared.clone()))), String::new()), shared)
    }

    #[test]
    fn healthy_gpus_are_reported_with_their_fields() {
        let (inv, _) = inventory(vec![Some(gpu("a"))]);
        let g = &inv.read().gpus[0];
        assert!(g.healthy, "{g:?}");
        assert_eq!(g.compute_capability, "9.0");
        assert_eq!(g.power_mw, None, "an unreported field stays absent");
    }

    #[test]
    fn uncorrectable_ecc_errors_and_overheating_make_a_gpu_unhealthy() {
        let mut ecc = gpu("a");
        ecc.ecc_uncorrected = Some(3);
        let mut hot = gpu("b");
        hot.temperature_c = Some(90);
        let (inv, _) = inventory(vec![Some(ecc), Some(hot), Some(gpu("c"))]);
        let gpus = inv.read().gpus;
        assert!(!gpus[0].healthy && gpus[0].health_reason.contains("3 uncorrectable ECC errors"));
        assert!(!gpus[1].healthy && gpus[1].health_reason.contains("slowdown threshold 88C"));
        assert!(gpus[2].healthy);
    }

    #[test]
    fn a_gpu_that_stops_answering_stays_listed_unhealthy() {
        let (inv, shared) = inventory(vec![Some(gpu("a")), Some(gpu("b"))]);
        assert_eq!(inv.read().gpus.len(), 2);
        shared.lock().unwrap()[0] = None;
        let gpus = inv.read().gpus;
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].uuid, "a");
        assert!(!gpus[0].healthy && gpus[0].health_reason.contains("GPU is lost"));
    }

    #[test]
    fn a_missing_library_means_cpu_only_not_a_crash() {
        let inv = Inventory::detect(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
        let read = inv.read();
        assert!(read.gpus.is_empty());
        assert!(!read.nvml_error.is_empty());
        assert!(read.cpus >= 1);
        assert!(read.memory_bytes > 0);
    }
}
