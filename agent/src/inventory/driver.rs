//! The thin layer: one NVML reading per call, nothing decided here. Every field a GPU may not
//! report is an `Option`; the logic above ([`super`]) decides what a reading means.

use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold};
use nvml_wrapper::enums::device::UsedGpuMemory;

/// One GPU as NVML reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawGpu {
    pub uuid: String,
    pub name: String,
    pub serial: Option<String>,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub slowdown_temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub compute_capability: Option<(i32, i32)>,
    pub ecc_uncorrected: Option<u64>,
    pub pci_bus_id: Option<String>,
    pub mig_enabled: Option<bool>,
    pub throttle_reasons: Option<Vec<String>>,
    pub numa_node: Option<u32>,
    /// Compute processes: pid and memory used (None where the driver cannot say).
    pub processes: Option<Vec<(u32, Option<u64>)>>,
}

/// A source of GPU readings: NVML, or a fake in tests.
pub trait GpuDriver: Send + Sync {
    fn driver_version(&self) -> Option<String>;
    fn count(&self) -> Result<u32, String>;
    /// Fails when the GPU does not answer at all (lost, fallen off the bus).
    fn read(&self, index: u32) -> Result<RawGpu, String>;
}

pub struct NvmlDriver(Nvml);

impl NvmlDriver {
    /// Loads `lib` (or the system's `libnvidia-ml.so.1`).
    pub fn load(lib: Option<&Path>) -> Result<NvmlDriver, String> {
        let mut builder = Nvml::builder();
        let default = std::ffi::OsStr::new("libnvidia-ml.so.1");
        builder.lib_path(lib.map(|p| p.as_os_str()).unwrap_or(default));
        builder.init().map(NvmlDriver).map_err(|e| e.to_string())
    }
}

impl GpuDriver for NvmlDriver {
    fn driver_version(&self) -> Option<String> {
        self.0.sys_driver_version().ok()
    }

    fn count(&self) -> Result<u32, String> {
        self.0.device_count().map_err(|e| e.to_string())
    }

    fn read(&self, index: u32) -> Result<RawGpu, String> {
        let d = self.0.device_by_index(index).map_err(|e| e.to_string())?;
        let uuid = d.uuid().map_err(|e| e.to_string())?;
        let memory = d.memory_info().ok();
        Ok(RawGpu {
            uuid,
            name: d.name().unwrap_or_default(),
            serial: d.serial().ok(),
            memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
            memory_used_bytes: memory.map(|m| m.used),
            utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            slowdown_temperature_c: d.temperature_threshold(TemperatureThreshold::Slowdown).ok(),
            power_mw: d.power_usage().ok(),
            power_limit_mw: d.enforced_power_limit().ok(),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            compute_capability: d.cuda_compute_capability().ok().map(|c| (c.major, c.minor)),
            ecc_uncorrected: d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
            pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
            mig_enabled: d.mig_mode().ok().map(|m| m.current == 1),
            throttle_reasons: d
                .current_throttle_reasons()
                .ok()
                .map(|r| r.iter_names().map(|(name, _)| name.to_lowercase()).collect()),
            numa_node: d.numa_node_id().ok(),
            processes: d.running_compute_processes().ok().map(|ps| {
                ps.into_iter()
                    .map(|p| {
                        let used = match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => Some(b),
                            UsedGpuMemory::Unavailable => None,
                        };
                        (p.pid, used)
                    })
                    .collect()
            }),
        })
    }
}
