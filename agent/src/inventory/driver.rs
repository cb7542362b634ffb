//! The thin layer: one NVML reading per call, nothing decided here. Every field a GPU may not
//! report is an `Option`; the logic above ([`super`]) decides what a reading means.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

use crate::error::{Error, Result};

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
    /// The PCI bus id at the far end of each active NVLink (a GPU or an NVSwitch).
    pub nvlink_remotes: Option<Vec<String>>,
    /// CPUs close to this GPU.
    pub cpu_affinity: Option<Vec<u32>>,
    pub mig_instances: Option<Vec<RawMig>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawMig {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
}

/// A source of GPU readings: NVML, or a fake in tests.
pub trait GpuDriver: Send + Sync {
    fn driver_version(&self) -> Option<String>;
    fn count(&self) -> Result<u32>;
    /// Fails when the GPU does not answer at all (lost, fallen off the bus).
    fn read(&self, index: u32) -> Result<RawGpu>;
    /// Blocks, calling `on_xid(uuid, xid)` for each critical XID error, until `stop` is set.
    /// Fails at once where the driver cannot deliver XID events.
    fn watch_xids(&self, stop: &AtomicBool, on_xid: &mut dyn FnMut(String, u64)) -> Result<()> {
        let _ = (stop, on_xid);
        Err(Error::XidEventsUnavailable("XID events are not supported"))
    }
}

/// Enough `c_ulong` words for a cpuset of 1,024 CPUs, on any word size.
const CPUSET_WORDS: usize = 1024 / std::ffi::c_ulong::BITS as usize;
/// NVML_NVLINK_MAX_LINKS.
const MAX_NVLINKS: u32 = 18;

pub struct NvmlDriver(Nvml);

impl NvmlDriver {
    /// Loads `lib` (or the system's `libnvidia-ml.so.1`).
    pub fn load(lib: Option<&Path>) -> Result<NvmlDriver> {
        let mut builder = Nvml::builder();
        let default = std::ffi::OsStr::new("libnvidia-ml.so.1");
        builder.lib_path(lib.map(|p| p.as_os_str()).unwrap_or(default));
        builder.init().map(NvmlDriver).map_err(Error::nvml("nvmlInit"))
    }
}

impl GpuDriver for NvmlDriver {
    fn driver_version(&self) -> Option<String> {
        self.0.sys_driver_version().ok()
    }

    fn count(&self) -> Result<u32> {
        self.0.device_count().map_err(Error::nvml("nvmlDeviceGetCount"))
    }

    fn read(&self, index: u32) -> Result<RawGpu> {
        let d = self.0.device_by_index(index).map_err(Error::nvml("nvmlDeviceGetHandleByIndex"))?;
        let uuid = d.uuid().map_err(Error::nvml("nvmlDeviceGetUUID"))?;
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
            nvlink_remotes: nvlink_remotes(&d),
            cpu_affinity: d.cpu_affinity(CPUSET_WORDS).ok().map(|words| cpus_of(&words)),
            mig_instances: mig_instances(&d),
        })
    }

    fn watch_xids(&self, stop: &AtomicBool, on_xid: &mut dyn FnMut(String, u64)) -> Result<()> {
        let mut set = self.0.create_event_set().map_err(Error::nvml("nvmlEventSetCreate"))?;
        let mut watched = 0;
        for index in 0..self.count()? {
            let Ok(d) = self.0.device_by_index(index) else { continue };
            if !d.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR)) {
                continue;
            }
            // On failure NVML frees the set, so one refusal ends the watch. (The error's `source`
            // is a failure of that freeing, which changes nothing here.)
            set = d
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| Error::nvml("nvmlDeviceRegisterEvents")(e.error))?;
            watched += 1;
        }
        if watched == 0 {
            return Err(Error::XidEventsUnavailable("no GPU delivers XID events"));
        }
        while !stop.load(Ordering::Relaxed) {
            match set.wait(500) {
                Ok(event) => {
                    let xid = match event.event_data {
                        Some(XidError::Value(v)) => v,
                        Some(XidError::Unknown) => 999,
                        None => continue,
                    };
                    on_xid(event.device.uuid().unwrap_or_default(), xid);
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => return Err(Error::nvml("nvmlEventSetWait")(e)),
            }
        }
        Ok(())
    }
}

fn nvlink_remotes(d: &nvml_wrapper::Device) -> Option<Vec<String>> {
    let mut remotes = Vec::new();
    for link in 0..MAX_NVLINKS {
        let l = d.link_wrapper_for(link);
        match l.is_active() {
            Ok(true) => {}
            Ok(false) => continue,
            // The first link answers "not supported" on GPUs without NVLink.
            Err(NvmlError::NotSupported) if link == 0 => return None,
            Err(_) => break,
        }
        if let Ok(pci) = l.remote_pci_info() {
            remotes.push(pci.bus_id);
        }
    }
    Some(remotes)
}

fn mig_instances(d: &nvml_wrapper::Device) -> Option<Vec<RawMig>> {
    if d.mig_mode().ok()?.current != 1 {
        return None;
    }
    let max = d.mig_device_count().ok()?;
    // Slots without an instance answer "not found": skip them.
    let instances = (0..max)
        .filter_map(|i| d.mig_device_by_index(i).ok())
        .filter_map(|m| {
            Some(RawMig {
                uuid: m.uuid().ok()?,
                name: m.name().unwrap_or_default(),
                memory_total_bytes: m.memory_info().map_or(0, |i| i.total),
            })
        })
        .collect();
    Some(instances)
}

/// The CPU numbers set in an NVML cpuset (words of `c_ulong`'s width).
fn cpus_of(words: &[std::ffi::c_ulong]) -> Vec<u32> {
    let bits = std::ffi::c_ulong::BITS;
    let mut cpus = Vec::new();
    for (w, word) in words.iter().enumerate() {
        cpus.extend((0..bits).filter(|bit| word >> bit & 1 == 1).map(|bit| w as u32 * bits + bit));
    }
    cpus
}
