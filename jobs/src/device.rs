//! Which device a run trains on: the first GPU that `CUDA_VISIBLE_DEVICES` names, where this
//! build has the CUDA backend (cargo feature `cuda`) and the GPU answers; the CPU otherwise.
//! A GPU that is named but not used is said in the run's first lines, never silently.

use std::path::Path;

/// Where a run's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Device {
    Cpu,
    /// The n-th GPU the process sees (CUDA numbers the visible ones from 0).
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device, and why a named GPU is not used when it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub device: Device,
    pub note: Option<String>,
    /// Why the chosen GPU cannot compute in bf16, where it cannot (cubecl reports bf16 on
    /// every GPU, whatever its hardware; the CPU backend answers for itself).
    pub no_bf16: Option<String>,
}

/// Why a GPU of compute capability `major.minor` cannot compute in bf16, if it cannot: bf16
/// arithmetic and tensor cores came with Ampere (8.0).
#[cfg(any(feature = "cuda", test))]
pub(crate) fn bf16_lacking(device: Device, (major, minor): (i32, i32)) -> Option<String> {
    (major < 8)
        .then(|| format!("device {device} has compute capability {major}.{minor} and bf16 needs 8.0 (Ampere) or later"))
}

/// The GPUs a `CUDA_VISIBLE_DEVICES` value names. Empty, unset, or starting with an invalid
/// entry ("-1", "none", ...) means none: CUDA itself stops at the first entry it cannot use.
pub(crate) fn visible_gpus(value: Option<&str>) -> Vec<String> {
    let mut gpus = Vec::new();
    for entry in value.unwrap_or("").split(',').map(str::trim) {
        let valid = entry.parse::<u32>().is_ok() || entry.starts_with("GPU-") || entry.starts_with("MIG-");
        if !valid {
            break;
        }
        gpus.push(entry.to_string());
    }
    gpus
}

/// Picks the device for a run that sees `gpus`; `kernel_cache` is where compiled GPU kernels
/// and autotune results persist between runs.
pub(crate) fn choose(gpus: &[String], kernel_cache: Option<&Path>) -> Choice {
    if gpus.is_empty() {
        return Choice { device: Device::Cpu, note: None, no_bf16: None };
    }
    gpu(gpus, kernel_cache)
}

#[cfg(not(feature = "cuda"))]
fn gpu(gpus: &[String], _kernel_cache: Option<&Path>) -> Choice {
    Choice {
        device: Device::Cpu,
        note: Some(format!(
            "CUDA_VISIBLE_DEVICES names {} but this build has no CUDA backend (cargo feature `cuda`): training on the CPU",
            gpus.join(",")
        )),
        no_bf16: None,
    }
}

#[cfg(feature = "cuda")]
fn gpu(gpus: &[String], kernel_cache: Option<&Path>) -> Choice {
    if let Some(dir) = kernel_cache {
        cuda::use_kernel_cache(dir);
    }
    match cuda::probe(0) {
        Ok(()) => {
            let device = Device::Cuda(0);
            let no_bf16 = match cuda::compute_capability(0) {
                Ok(capability) => bf16_lacking(device, capability),
                Err(why) => Some(format!("the compute capability of device {device} could not be read ({why})")),
            };
            Choice { device, note: None, no_bf16 }
        }
        Err(why) => Choice {
            device: Device::Cpu,
            note: Some(format!(
                "CUDA_VISIBLE_DEVICES names {} but the GPU did not answer ({why}): training on the CPU",
                gpus.join(",")
            )),
            no_bf16: None,
        },
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::Path;

    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::Tensor;
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    use cudarc::driver::result::{self, DriverError};
    use cudarc::driver::sys::CUdevice_attribute;

    use crate::error::JobsError;

    /// Compiled kernels and autotune results go under `dir`, so a job does not pay the JIT and
    /// autotuning again on a GPU model this agent has trained on before. The configuration is
    /// per process and can be set once, before the first kernel: a later call with another
    /// directory, in the same process, changes nothing.
    pub(super) fn use_kernel_cache(dir: &Path) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // cubecl.toml and CUBECL_* settings as cubecl itself would read them, plus the cache.
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            config.autotune.cache = CacheConfig::File(dir.join("autotune"));
            config.compilation.cache = Some(CacheConfig::File(dir.join("kernels")));
            // Set only if nothing has read the configuration yet (it panics otherwise).
            let _ = std::panic::catch_unwind(|| CubeClRuntimeConfig::set(config));
        });
    }

    /// What a GPU run needs besides the GPU, checked before the first kernel so that every
    /// missing part is named at once: the driver, NVRTC (kernels are compiled at run time) and
    /// the CUDA headers NVRTC reads. Then one small kernel on GPU `index` catches the rest.
    pub(super) fn probe(index: usize) -> Result<(), JobsError> {
        let mut missing = Vec::new();
        // SAFETY: each loads a shared library (dlopen), as every CUDA program does; their
        // initialisers are NVIDIA's, run by any CUDA program.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            missing.push("the NVIDIA driver's libcuda.so.1".to_string());
        }
        // By name: the kernels are built for CUDA 13's API, and cudarc would take an older one.
        if unsafe { libloading::Library::new("libnvrtc.so.13") }.is_err() {
            missing.push(
                "NVRTC's libnvrtc.so.13, from CUDA 13 (install it, or add its directory to LD_LIBRARY_PATH)"
                    .to_string(),
            );
        }
        let headers = cubecl::cuda::install::cuda_path().map(|p| p.join("include"));
        if !headers.as_ref().is_some_and(|dir| dir.join("cuda_runtime.h").exists()) {
            let place = headers.map_or("CUDA_PATH or /usr/local/cuda".to_string(), |d| d.display().to_string());
            missing
                .push(format!("the CUDA headers in {place} (set CUDA_PATH to a directory whose include/ holds them)"));
        }
        if !missing.is_empty() {
            return Err(JobsError::GpuMissing(missing));
        }
        let run = std::panic::catch_unwind(|| {
            let device = CudaDevice::new(index);
            let x = Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device);
            (x + 1.0).into_data().into_vec::<f32>()
        });
        let failed = match run {
            Ok(Ok(v)) if v == [2.0, 3.0] => return Ok(()),
            Ok(Ok(v)) => format!("a test kernel computed {v:?}, not [2.0, 3.0]"),
            Ok(Err(e)) => format!("{e:?}"),
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA runtime panicked".into()),
        };
        Err(JobsError::GpuFailed(failed))
    }

    /// `(major, minor)` of visible GPU `index`, from the driver (the kernel probe has
    /// initialised it).
    pub(super) fn compute_capability(index: usize) -> Result<(i32, i32), JobsError> {
        let read = || {
            result::init()?;
            let dev = result::device::get(index as i32)?;
            // SAFETY: `dev` is a device handle the driver just gave; reading attributes
            // changes nothing.
            let attribute = |a| unsafe { result::device::get_attribute(dev, a) };
            Ok::<_, DriverError>((
                attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ))
        };
        read().map_err(|e| JobsError::GpuAttribute(format!("{e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_gpus_follow_cuda_rules() {
        assert!(visible_gpus(None).is_empty());
        assert!(visible_gpus(Some("")).is_empty());
        assert!(visible_gpus(Some("-1")).is_empty());
        assert_eq!(visible_gpus(Some("GPU-a1, GPU-b2")), ["GPU-a1", "GPU-b2"]);
        assert_eq!(visible_gpus(Some("0,2")), ["0", "2"]);
        assert_eq!(visible_gpus(Some("1,-1,0")), ["1"], "CUDA stops at the first invalid entry");
    }

    #[test]
    fn no_gpu_means_the_cpu_without_a_note() {
        assert_eq!(choose(&[], None), Choice { device: Device::Cpu, note: None, no_bf16: None });
    }

    #[test]
    fn bf16_needs_ampere_or_later() {
        let gpu = Device::Cpu; // The device only names itself in the reason.
        assert_eq!(
            bf16_lacking(gpu, (7, 5)).unwrap(),
            "device cpu has compute capability 7.5 and bf16 needs 8.0 (Ampere) or later"
        );
        for ok in [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(bf16_lacking(gpu, ok), None, "{ok:?}");
        }
    }

    /// With the CUDA backend, a named GPU is used where an NVIDIA driver is loaded; where none
    /// is (as on a machine without a GPU), the failed probe is said and the CPU used.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_named_gpu_is_used_where_the_driver_answers() {
        let choice = choose(&["0".to_string()], None);
        if Path::new("/proc/driver/nvidia/version").exists() {
            // With a driver, the GPU is used, or something other than the driver is missing.
            let driver_said_missing = choice.note.as_ref().is_some_and(|n| n.contains("libcuda.so.1"));
            assert!(choice.device == Device::Cuda(0) || !driver_said_missing, "{choice:?}");
        } else {
            assert_eq!(choice.device, Device::Cpu);
            let note = choice.note.unwrap();
            assert!(
                note.contains("names 0 but the GPU did not answer (missing the NVIDIA driver's libcuda.so.1"),
                "{note}"
            );
        }
    }

    /// A build without the CUDA backend says so, and trains on the CPU.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_named_gpu_without_the_cuda_backend_is_said_and_the_cpu_used() {
        let choice = choose(&["GPU-1234".to_string()], None);
        assert_eq!(choice.device, Device::Cpu);
        assert!(choice.note.unwrap().contains("GPU-1234 but this build has no CUDA backend"));
    }
}
