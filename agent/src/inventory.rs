//! What this machine offers: CPUs, memory and, through NVML, its NVIDIA GPUs.
//!
//! NVML is optional: with no driver (or a library that fails to load) the agent offers CPU only
//! and says why; it never fails to start for lack of a GPU. Any telemetry field a GPU does not
//! report is left absent.

use std::path::Path;

use gantry_proto::v1;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use tracing::{info, warn};

pub struct Inventory {
    nvml: Option<Nvml>,
    base: v1::Inventory,
    /// The GPUs as last read, by index: a GPU that stops answering stays listed, unhealthy.
    last: std::sync::Mutex<Vec<v1::GpuInfo>>,
}

impl Inventory {
    /// Loads NVML from `lib` (or the system's `libnvidia-ml.so.1`) and reads the GPUs once.
    pub fn detect(lib: Option<&Path>) -> Inventory {
        let base = v1::Inventory {
            hostname: hostname(),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: total_memory().unwrap_or(0),
            ..Default::default()
        };
        let mut builder = Nvml::builder();
        let default = std::ffi::OsStr::new("libnvidia-ml.so.1");
        builder.lib_path(lib.map(|p| p.as_os_str()).unwrap_or(default));
        let mut inv = match builder.init() {
            Ok(nvml) => Inventory { nvml: Some(nvml), base, last: Default::default() },
            Err(e) => {
                info!(error = %e, "no NVIDIA library: offering CPU only");
                let base = v1::Inventory { nvml_error: e.to_string(), ..base };
                Inventory { nvml: None, base, last: Default::default() }
            }
        };
        if let Some(nvml) = &inv.nvml {
            inv.base.gpu_driver = nvml.sys_driver_version().unwrap_or_default();
        }
        inv
    }

    /// The current inventory with fresh telemetry.
    pub fn read(&self) -> v1::Inventory {
        let mut out = self.base.clone();
        if let Some(nvml) = &self.nvml {
            let mut last = self.last.lock().expect("inventory lock poisoned");
            out.gpus = read_gpus(nvml, &last);
            *last = out.gpus.clone();
        }
        out
    }
}

fn read_gpus(nvml: &Nvml, last: &[v1::GpuInfo]) -> Vec<v1::GpuInfo> {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NVML could not count GPUs");
            return Vec::new();
        }
    };
    let mut gpus = Vec::new();
    for index in 0..count {
        let opened = nvml.device_by_index(index).and_then(|d| d.uuid().map(|uuid| (d, uuid)));
        let (device, uuid) = match opened {
            Ok(found) => found,
            Err(e) => {
                // A GPU known before that no longer answers (lost, fallen off the bus) stays in
                // the inventory, unhealthy, so nothing more is placed on it and people see why.
                if let Some(known) = last.get(index as usize) {
                    warn!(index, uuid = %known.uuid, error = %e, "GPU stopped answering");
                    gpus.push(v1::GpuInfo {
                        healthy: false,
                        health_reason: format!("NVML: {e}"),
                        utilization_percent: None,
                        temperature_c: None,
                        power_mw: None,
                        memory_used_bytes: None,
                        ..known.clone()
                    });
                } else {
                    warn!(index, error = %e, "NVML could not open a GPU");
                }
                continue;
            }
        };
        let memory = device.memory_info().ok();
        gpus.push(v1::GpuInfo {
            uuid,
            name: device.name().unwrap_or_default(),
            memory_total_bytes: memory.as_ref().map(|m| m.total).unwrap_or(0),
            index,
            memory_used_bytes: memory.map(|m| m.used),
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: device.power_usage().ok(),
            healthy: true,
            health_reason: String::new(),
        });
    }
    gpus
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
