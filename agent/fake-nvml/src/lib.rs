//! A fake `libnvidia-ml.so.1` for tests. It exports the NVML C functions the agent calls and
//! answers from `devices.json` in the library's own directory, read on every call, so a test can
//! change a GPU while the agent runs. Copy the library into a directory of its own per test.
//!
//! A field missing from the file answers NVML_ERROR_NOT_SUPPORTED; a device with `"lost": true`
//! answers NVML_ERROR_GPU_IS_LOST. Nothing here may panic across `extern "C"`.
//!
//! Handles encode the device index + 1 in the low 16 bits and, for a MIG instance, its index + 1
//! above them. XID events: each number appended to a device's `xid_events` is delivered once by
//! `nvmlEventSetWait_v2` to every event set registered for that device.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{CStr, c_char, c_uint, c_void};
use std::path::PathBuf;

use serde::Deserialize;

type Ret = c_uint;
const SUCCESS: Ret = 0;
const INVALID_ARGUMENT: Ret = 2;
const NOT_SUPPORTED: Ret = 3;
const INSUFFICIENT_SIZE: Ret = 7;
const TIMEOUT: Ret = 10;
const GPU_IS_LOST: Ret = 15;
const NOT_FOUND: Ret = 6;
/// nvmlEventTypeXidCriticalError.
const XID_CRITICAL: u64 = 8;
const UNKNOWN: Ret = 999;

#[derive(Deserialize, Default)]
struct Fleet {
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Deserialize, Clone, Default)]
struct Device {
    uuid: String,
    name: String,
    memory_total_bytes: u64,
    memory_used_bytes: Option<u64>,
    utilization_percent: Option<u32>,
    temperature_c: Option<u32>,
    power_mw: Option<u32>,
    serial: Option<String>,
    compute_capability: Option<(i32, i32)>,
    sm_clock_mhz: Option<u32>,
    power_limit_mw: Option<u32>,
    ecc_uncorrected: Option<u64>,
    slowdown_temperature_c: Option<u32>,
    pci_bus_id: Option<String>,
    mig_enabled: Option<bool>,
    /// NVML's clocks-throttle-reasons bitmask.
    throttle_reasons: Option<u64>,
    numa_node: Option<u32>,
    /// Compute processes: (pid, bytes used).
    processes: Option<Vec<(u32, u64)>>,
    /// Per NVLink: the remote end's PCI bus id (another GPU, or an NVSwitch); null for a link
    /// that is down. Absent: NVLink not supported.
    nvlinks: Option<Vec<Option<String>>>,
    /// CPUs close to the GPU.
    cpu_affinity: Option<Vec<u32>>,
    /// MIG instances, when MIG is on.
    mig_instances: Option<Vec<MigInstance>>,
    /// Critical XID errors so far; present means the device supports XID events.
    xid_events: Option<Vec<u64>>,
    #[serde(default)]
    lost: bool,
}

#[derive(Deserialize, Clone)]
struct MigInstance {
    uuid: String,
    name: String,
    memory_total_bytes: u64,
}

impl Device {
    /// A MIG instance answers as a device of its own, with only its identity and memory.
    fn mig(&self, i: usize) -> Option<Device> {
        let m = self.mig_instances.as_ref()?.get(i)?;
        Some(Device {
            uuid: m.uuid.clone(),
            name: m.name.clone(),
            memory_total_bytes: m.memory_total_bytes,
            ..Device::default()
        })
    }
}

/// The file beside this library, found through the library's own path.
fn devices_file() -> Option<PathBuf> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address of one of our own functions.
    let found = unsafe { libc::dladdr(nvmlInit_v2 as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }.to_str().ok()?;
    Some(PathBuf::from(path).parent()?.join("devices.json"))
}

fn fleet() -> Option<Fleet> {
    let text = std::fs::read_to_string(devices_file()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs `f` with the device (or MIG instance) behind `handle`, catching any panic.
fn with_device(handle: *mut c_void, f: impl FnOnce(&Device) -> Ret) -> Ret {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let index = (handle as usize & 0xffff).wrapping_sub(1);
        let mig = (handle as usize >> 16).checked_sub(1);
        let Some(fleet) = fleet() else { return UNKNOWN };
        match (fleet.devices.get(index), mig) {
            (Some(d), _) if d.lost => GPU_IS_LOST,
            (Some(d), None) => f(d),
            (Some(d), Some(m)) => d.mig(m).map_or(INVALID_ARGUMENT, |m| f(&m)),
            (None, _) => INVALID_ARGUMENT,
        }
    }))
    .unwrap_or(UNKNOWN)
}

fn write_str(text: &str, buf: *mut c_char, len: c_uint) -> Ret {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a buffer of `len` bytes; we write at most len - 1 plus a NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

fn write_u32(value: Option<u32>, out: *mut c_uint) -> Ret {
    match value {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(v) => {
            // SAFETY: checked non-null; the caller owns the target.
            unsafe { *out = v };
            SUCCESS
        }
        None => NOT_SUPPORTED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(_result: Ret) -> *const c_char {
    c"fake NVML error".as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> Ret {
    std::panic::catch_unwind(|| {
        let driver = fleet().and_then(|f| f.driver).unwrap_or_else(|| "fake".into());
        write_str(&driver, buf, len)
    })
    .unwrap_or(UNKNOWN)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    std::panic::catch_unwind(|| write_u32(Some(fleet().map_or(0, |f| f.devices.len() as u32)), count))
        .unwrap_or(UNKNOWN)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, handle: *mut *mut c_void) -> Ret {
    if handle.is_null() {
        return INVALID_ARGUMENT;
    }
    let count = std::panic::catch_unwind(|| fleet().map_or(0, |f| f.devices.len())).unwrap_or(0);
    if index as usize >= count {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null. Handles are index + 1, never dereferenced.
    unsafe { *handle = (index as usize + 1) as *mut c_void };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(handle: *mut c_void, buf: *mut c_char, len: c_uint) -> Ret {
    with_device(handle, |d| write_str(&d.uuid, buf, len))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(handle: *mut c_void, buf: *mut c_char, len: c_uint) -> Ret {
    with_device(handle, |d| write_str(&d.name, buf, len))
}

/// nvmlMemory_v2_t: version, total, reserved, free, used.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(handle: *mut c_void, out: *mut MemoryV2) -> Ret {
    with_device(handle, |d| {
        if out.is_null() {
            return INVALID_ARGUMENT;
        }
        let used = d.memory_used_bytes.unwrap_or(0);
        // SAFETY: checked non-null; the caller set `version` and owns the struct.
        unsafe {
            (*out).total = d.memory_total_bytes;
            (*out).reserved = 0;
            (*out).used = used;
            (*out).free = d.memory_total_bytes.saturating_sub(used);
        }
        SUCCESS
    })
}

#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(handle: *mut c_void, out: *mut Utilization) -> Ret {
    with_device(handle, |d| match d.utilization_percent {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(u) => {
            // SAFETY: checked non-null.
            unsafe { *out = Utilization { gpu: u, memory: u } };
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(handle: *mut c_void, _sensor: c_uint, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.temperature_c, out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(handle: *mut c_void, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.power_mw, out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(handle: *mut c_void, buf: *mut c_char, len: c_uint) -> Ret {
    with_device(handle, |d| match &d.serial {
        Some(serial) => write_str(serial, buf, len),
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    handle: *mut c_void,
    major: *mut libc::c_int,
    minor: *mut libc::c_int,
) -> Ret {
    with_device(handle, |d| match d.compute_capability {
        _ if major.is_null() || minor.is_null() => INVALID_ARGUMENT,
        Some((a, b)) => {
            // SAFETY: checked non-null.
            unsafe {
                *major = a;
                *minor = b;
            }
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(handle: *mut c_void, _clock: c_uint, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.sm_clock_mhz, out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(handle: *mut c_void, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.power_limit_mw, out))
}

/// NVML_TEMPERATURE_THRESHOLD_SLOWDOWN is 1; other thresholds are not served.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(handle: *mut c_void, kind: c_uint, out: *mut c_uint) -> Ret {
    with_device(handle, |d| if kind == 1 { write_u32(d.slowdown_temperature_c, out) } else { NOT_SUPPORTED })
}

/// Error type 1 is NVML_MEMORY_ERROR_TYPE_UNCORRECTED; corrected counts are not served.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    handle: *mut c_void,
    error_type: c_uint,
    _counter: c_uint,
    out: *mut u64,
) -> Ret {
    with_device(handle, |d| match d.ecc_uncorrected {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(n) if error_type == 1 => {
            // SAFETY: checked non-null.
            unsafe { *out = n };
            SUCCESS
        }
        _ => NOT_SUPPORTED,
    })
}

/// nvmlPciInfo_t (v3 layout).
#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(handle: *mut c_void, out: *mut PciInfo) -> Ret {
    with_device(handle, |d| match &d.pci_bus_id {
        Some(id) => write_pci(id, out),
        None => NOT_SUPPORTED,
    })
}

fn write_pci(id: &str, out: *mut PciInfo) -> Ret {
    if out.is_null() || id.len() >= 32 {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; every field is written, strings NUL-terminated.
    unsafe {
        std::ptr::write_bytes(out, 0, 1);
        let legacy: Vec<u8> = id.bytes().take(15).collect();
        std::ptr::copy_nonoverlapping(legacy.as_ptr(), (*out).bus_id_legacy.as_mut_ptr() as *mut u8, legacy.len());
        std::ptr::copy_nonoverlapping(id.as_ptr(), (*out).bus_id.as_mut_ptr() as *mut u8, id.len());
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(handle: *mut c_void, current: *mut c_uint, pending: *mut c_uint) -> Ret {
    with_device(handle, |d| match d.mig_enabled {
        _ if current.is_null() || pending.is_null() => INVALID_ARGUMENT,
        Some(on) => {
            // SAFETY: checked non-null.
            unsafe {
                *current = on as c_uint;
                *pending = on as c_uint;
            }
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(handle: *mut c_void, out: *mut u64) -> Ret {
    with_device(handle, |d| match d.throttle_reasons {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(mask) => {
            // SAFETY: checked non-null.
            unsafe { *out = mask };
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNumaNodeId(handle: *mut c_void, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.numa_node, out))
}

/// nvmlProcessInfo_t (v2 layout, used by the _v3 call).
#[repr(C)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// Called twice by clients: first to learn the count (NVML_ERROR_INSUFFICIENT_SIZE), then to fill.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    handle: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    with_device(handle, |d| {
        let Some(list) = &d.processes else { return NOT_SUPPORTED };
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: checked non-null; `infos` holds `*count` entries when non-null.
        unsafe {
            let room = *count as usize;
            *count = list.len() as c_uint;
            if list.is_empty() {
                return SUCCESS;
            }
            if infos.is_null() || room < list.len() {
                return INSUFFICIENT_SIZE;
            }
            for (i, (pid, used)) in list.iter().enumerate() {
                // u32::MAX marks "no MIG instance", as NVML does.
                *infos.add(i) = ProcessInfo {
                    pid: *pid,
                    used_gpu_memory: *used,
                    gpu_instance_id: u32::MAX,
                    compute_instance_id: u32::MAX,
                };
            }
        }
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(handle: *mut c_void, link: c_uint, out: *mut c_uint) -> Ret {
    with_device(handle, |d| match d.nvlinks.as_ref().map(|l| l.get(link as usize)) {
        None => NOT_SUPPORTED,
        Some(None) => INVALID_ARGUMENT,
        Some(Some(remote)) => write_u32(Some(remote.is_some() as u32), out),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkRemotePciInfo_v2(
    handle: *mut c_void,
    link: c_uint,
    out: *mut PciInfo,
) -> Ret {
    with_device(handle, |d| match d.nvlinks.as_ref().map(|l| l.get(link as usize)) {
        None => NOT_SUPPORTED,
        Some(Some(Some(remote))) => write_pci(remote, out),
        Some(_) => INVALID_ARGUMENT,
    })
}

/// cpuSet: `size` words of 64 bits, bit i for CPU i.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCpuAffinity(handle: *mut c_void, size: c_uint, out: *mut u64) -> Ret {
    with_device(handle, |d| match &d.cpu_affinity {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(cpus) => {
            for cpu in cpus.iter().filter(|c| (**c as usize) < size as usize * 64) {
                // SAFETY: checked non-null; the caller gave `size` words and the index is below it.
                unsafe { *out.add(*cpu as usize / 64) |= 1 << (cpu % 64) };
            }
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(handle: *mut c_void, out: *mut c_uint) -> Ret {
    with_device(handle, |d| write_u32(d.mig_instances.as_ref().map(|m| m.len() as u32), out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    handle: *mut c_void,
    index: c_uint,
    out: *mut *mut c_void,
) -> Ret {
    let parent = handle as usize & 0xffff;
    with_device(handle, |d| match &d.mig_instances {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(list) if (index as usize) < list.len() => {
            // SAFETY: checked non-null.
            unsafe { *out = (parent | ((index as usize + 1) << 16)) as *mut c_void };
            SUCCESS
        }
        Some(_) => NOT_FOUND,
        None => NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(handle: *mut c_void, out: *mut u64) -> Ret {
    with_device(handle, |d| match d.xid_events {
        _ if out.is_null() => INVALID_ARGUMENT,
        Some(_) => {
            // SAFETY: checked non-null.
            unsafe { *out = XID_CRITICAL };
            SUCCESS
        }
        None => NOT_SUPPORTED,
    })
}

/// An event set: the devices registered and how many of each one's XIDs were delivered.
#[derive(Default)]
struct EventSet {
    devices: Vec<(usize, usize)>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(out: *mut *mut c_void) -> Ret {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; freed by nvmlEventSetFree.
    unsafe { *out = Box::into_raw(Box::<EventSet>::default()) as *mut c_void };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: *mut c_void) -> Ret {
    if !set.is_null() {
        // SAFETY: made by nvmlEventSetCreate, freed once.
        drop(unsafe { Box::from_raw(set as *mut EventSet) });
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(handle: *mut c_void, types: u64, set: *mut c_void) -> Ret {
    with_device(handle, |d| {
        if set.is_null() || types & !XID_CRITICAL != 0 {
            return if set.is_null() { INVALID_ARGUMENT } else { NOT_SUPPORTED };
        }
        let Some(seen) = d.xid_events.as_ref().map(|x| x.len()) else { return NOT_SUPPORTED };
        // SAFETY: a set made by nvmlEventSetCreate; NVML's callers use one set from one thread.
        let set = unsafe { &mut *(set as *mut EventSet) };
        // Only errors after registration are delivered, as with the real driver.
        set.devices.push((handle as usize & 0xffff, seen));
        SUCCESS
    })
}

/// nvmlEventData_t.
#[repr(C)]
pub struct EventData {
    device: *mut c_void,
    event_type: u64,
    event_data: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(set: *mut c_void, out: *mut EventData, timeout_ms: c_uint) -> Ret {
    if set.is_null() || out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: a set made by nvmlEventSetCreate, used from one thread.
    let set = unsafe { &mut *(set as *mut EventSet) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64);
    loop {
        let fleet = std::panic::catch_unwind(fleet).ok().flatten().unwrap_or_default();
        for (handle, delivered) in &mut set.devices {
            let xids = fleet.devices.get(*handle - 1).and_then(|d| d.xid_events.clone()).unwrap_or_default();
            if let Some(xid) = xids.get(*delivered) {
                *delivered += 1;
                // SAFETY: checked non-null.
                unsafe {
                    *out = EventData {
                        device: *handle as *mut c_void,
                        event_type: XID_CRITICAL,
                        event_data: *xid,
                        gpu_instance_id: u32::MAX,
                        compute_instance_id: u32::MAX,
                    }
                };
                return SUCCESS;
            }
        }
        if std::time::Instant::now() >= deadline {
            return TIMEOUT;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
