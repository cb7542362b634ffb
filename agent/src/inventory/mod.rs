//! What this machine offers: CPUs, memory and, through NVML, its NVIDIA GPUs, with their health.
//!
//! Two layers: [`driver`] mirrors NVML calls and returns raw readings; this module decides what
//! they mean (health) and keeps a GPU that stops answering listed, unhealthy. NVML is optional:
//! with no driver (or a library that fails to load) the agent offers CPU only and says why; it
//! never fails to start for lack of a GPU.

pub mod driver;
mod topology;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use driver::{GpuDriver, NvmlDriver, RawGpu};
use gantry_proto::v1;
use tracing::{info, warn};

pub struct Inventory {
    driver: Option<Arc<dyn GpuDriver>>,
    base: v1::Inventory,
    /// The GPUs as last read, by index: a GPU that stops answering stays listed, unhealthy.
    last: Mutex<Vec<v1::GpuInfo>>,
    /// Critical XID errors by GPU UUID, from the watcher thread. They stick until the agent
    /// restarts: a GPU that reported one needs an operator's look.
    xids: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    stop_watch: Arc<AtomicBool>,
}

impl Drop for Inventory {
    fn drop(&mut self) {
        self.stop_watch.store(true, Ordering::Relaxed);
    }
}

impl Inventory {
    /// Loads NVML from `lib` (or the system's `libnvidia-ml.so.1`).
    pub fn detect(lib: Option<&Path>) -> Inventory {
        match NvmlDriver::load(lib) {
            Ok(driver) => Inventory::with_driver(Some(Box::new(driver)), String::new()),
            Err(e) => {
                info!(error = %e, "no NVIDIA library: offering CPU only");
                Inventory::with_driver(None, e.to_string())
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
        let driver: Option<Arc<dyn GpuDriver>> = driver.map(Arc::from);
        let inventory =
            Inventory { driver, base, last: Mutex::new(Vec::new()), xids: Arc::default(), stop_watch: Arc::default() };
        inventory.watch_xids();
        inventory
    }

    /// Listens for XID events on a thread of its own (NVML's wait blocks).
    fn watch_xids(&self) {
        let Some(driver) = self.driver.clone() else { return };
        let (xids, stop) = (self.xids.clone(), self.stop_watch.clone());
        let spawned = std::thread::Builder::new().name("xid-events".into()).spawn(move || {
            let mut record = |uuid: String, xid: u64| {
                warn!(gpu = %uuid, xid, "XID error: {}", xid_meaning(xid));
                let mut xids = xids.lock().expect("xid lock poisoned");
                let list = xids.entry(uuid).or_default();
                list.push(xid);
                if list.len() > MAX_XIDS {
                    list.remove(0);
                }
            };
            if let Err(e) = driver.watch_xids(&stop, &mut record) {
                info!(error = %e, "not watching XID events");
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the XID watcher");
        }
    }

    /// The current inventory with fresh telemetry and health.
    pub fn read(&self) -> v1::Inventory {
        let mut out = self.base.clone();
        if let Some(driver) = &self.driver {
            let mut last = self.last.lock().expect("inventory lock poisoned");
            let xids = self.xids.lock().expect("xid lock poisoned").clone();
            out.gpus = read_gpus(driver.as_ref(), &last, &xids);
            *last = out.gpus.clone();
        }
        out
    }
}

/// XID errors kept per GPU.
const MAX_XIDS: usize = 16;

fn read_gpus(driver: &dyn GpuDriver, last: &[v1::GpuInfo], xids: &HashMap<String, Vec<u64>>) -> Vec<v1::GpuInfo> {
    let count = match driver.count() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NVML could not count GPUs");
            return last.iter().map(|g| lost(g, &e)).collect();
        }
    };
    let readings: Vec<(u32, crate::Result<RawGpu>)> =
        (0..count.max(last.len() as u32)).map(|i| (i, driver.read(i))).collect();
    let peers = topology::nvlink_peers(readings.iter().filter_map(|(_, r)| r.as_ref().ok()));
    let mut gpus = Vec::new();
    for (index, reading) in readings {
        match reading {
            Ok(raw) => {
                let xids = xids.get(&raw.uuid).cloned().unwrap_or_default();
                let peers = peers.get(&raw.uuid).cloned().unwrap_or_default();
                gpus.push(to_info(index, raw, peers, xids))
            }
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

fn lost(known: &v1::GpuInfo, error: &crate::Error) -> v1::GpuInfo {
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

/// A reading, and whether it is healthy: uncorrectable ECC errors, a critical XID error, or a
/// temperature at or above the slowdown threshold make a GPU unhealthy.
fn to_info(index: u32, raw: RawGpu, nvlink_peers: Vec<String>, xid_errors: Vec<u64>) -> v1::GpuInfo {
    let mut problems = Vec::new();
    if let Some(xid) = xid_errors.iter().rev().find(|x| !application_xid(**x)) {
        problems.push(format!("XID {xid}: {}", xid_meaning(*xid)));
    }
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
        nvlink_peers,
        cpu_affinity: raw.cpu_affinity.map(|c| topology::cpu_list(&c)).unwrap_or_default(),
        mig_instances: raw
            .mig_instances
            .unwrap_or_default()
            .into_iter()
            .map(|m| v1::MigInstance { uuid: m.uuid, name: m.name, memory_total_bytes: m.memory_total_bytes })
            .collect(),
        xid_errors,
    }
}

/// XIDs caused by the application rather than the GPU (NVIDIA's device plugin skips the same
/// ones): they say nothing about the GPU's health.
fn application_xid(xid: u64) -> bool {
    matches!(xid, 13 | 31 | 43 | 45 | 68 | 109)
}

/// The meaning of the XIDs operators meet most, from NVIDIA's XID catalogue.
fn xid_meaning(xid: u64) -> &'static str {
    match xid {
        13 => "graphics engine exception (application)",
        31 => "GPU memory page fault (application)",
        43 => "GPU stopped processing (application)",
        45 => "preemptive cleanup (application)",
        48 => "double-bit ECC error",
        63 => "ECC page retirement or row remapping",
        64 => "ECC page retirement or row remapping failure",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP error",
        _ => "critical error reported by the driver",
    }
}

/// This machine's name, as the kernel has it; "localhost" if unreadable.
pub fn hostname() -> String {
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
    use nvml_wrapper::error::NvmlError;

    use super::*;

    /// Readings by index, changeable by the test; `None` is a GPU that does not answer.
    struct Fake(std::sync::Arc<Mutex<Vec<Option<RawGpu>>>>);

    impl GpuDriver for Fake {
        fn driver_version(&self) -> Option<String> {
            Some("fake".into())
        }
        fn count(&self) -> crate::Result<u32> {
            Ok(self.0.lock().unwrap().len() as u32)
        }
        fn read(&self, index: u32) -> crate::Result<RawGpu> {
            let lost = crate::Error::Nvml { call: "nvmlDeviceGetHandleByIndex", source: NvmlError::GpuLost };
            self.0.lock().unwrap()[index as usize].clone().ok_or(lost)
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
    fn a_critical_xid_makes_a_gpu_unhealthy_and_an_application_xid_does_not() {
        let (inv, _) = inventory(vec![Some(gpu("a")), Some(gpu("b"))]);
        inv.xids.lock().unwrap().insert("a".into(), vec![79]);
        inv.xids.lock().unwrap().insert("b".into(), vec![13, 31]);
        let gpus = inv.read().gpus;
        assert!(!gpus[0].healthy);
        assert_eq!(gpus[0].health_reason, "XID 79: GPU has fallen off the bus");
        assert_eq!(gpus[0].xid_errors, vec![79]);
        assert!(gpus[1].healthy, "{:?}", gpus[1]);
        assert_eq!(gpus[1].xid_errors, vec![13, 31], "listed all the same");
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
        assert!(!gpus[0].healthy && gpus[0].health_reason.contains("fell off the bus"), "{:?}", gpus[0]);
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
