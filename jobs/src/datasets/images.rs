//! Image folders: a folder per class (its name is the class), PNG and JPEG files in it, each
//! decoded once, resized to the spec's size and kept as numbers in 0..=1, channels first. With
//! `augment`, a training image is padded, randomly cropped back and flipped left to right,
//! differently every epoch but the same for the same (seed, epoch, image), so a resumed run
//! sees exactly what it would have.

use std::path::{Path, PathBuf};

use gantry_core::spec::Holdout;
use image::imageops::FilterType;

use super::text::data_error;
use super::{Examples, Prepared, PreparedInput, Targets, split_by_seed};
use crate::error::JobsError;
use crate::input::InputShape;
use crate::rng::SplitMix64;

/// The stream of a seed that draws the held-out images.
const SPLIT_STREAM: u64 = u64::MAX - 4;
/// Added to the seed for augmentation's draws, apart from every other stream of it.
const AUGMENT_SALT: u64 = 0x0061_7567_6d65_6e74; // "augment"
/// More classes than this is a folder of folders given by mistake.
const MAX_CLASSES: usize = 10_000;

/// An image folder, decoded and split: what the CNN (or an MLP) trains and is evaluated on.
pub(crate) struct Images {
    pub(crate) train: ImageSet,
    pub(crate) test: ImageSet,
    pub(crate) shape: InputShape,
}

/// Decoded images of one side of the split.
pub(crate) struct ImageSet {
    /// [channels, height, width].
    image: [usize; 3],
    pixels: Vec<f32>,
    y: Vec<i64>,
    /// The seed augmentation draws from; none: images are given as they are.
    augment: Option<u64>,
}

impl Images {
    /// The folder `dir`, images resized to `image` ([channels, height, width]; 1 channel is
    /// grey, 3 colour), held out as `holdout` says (drawn by `seed` for a fraction).
    pub(crate) fn read(
        dir: &Path,
        image: [usize; 3],
        augment: bool,
        holdout: &Holdout,
        seed: u64,
    ) -> Result<Images, JobsError> {
        let classes = class_folders(dir)?;
        if classes.len() < 2 || classes.len() > MAX_CLASSES {
            let reason = format!("{} class folders: a classifier needs 2 to {MAX_CLASSES}", classes.len());
            return Err(data_error(dir, None, reason));
        }
        let names: Vec<String> = classes.iter().map(|(name, _)| name.clone()).collect();
        let all = decode_all(&classes, image)?;
        let (train, test) = match holdout {
            Holdout::Fraction(f) => {
                let (train, test) = split_by_seed(all.y.len(), *f, seed, SPLIT_STREAM, "images")
                    .map_err(|reason| data_error(dir, None, reason))?;
                (all.subset(&train), all.subset(&test))
            }
            Holdout::File(test_dir) => {
                let test_dir = Path::new(test_dir);
                let test_classes = class_folders(test_dir)?;
                for (name, _) in &test_classes {
                    if !names.contains(name) {
                        let reason = format!("class folder `{name}` is not among the training folder's classes");
                        return Err(data_error(test_dir, None, reason));
                    }
                }
                let mut test = decode_all(&test_classes, image)?;
                // Class numbers are the training folder's.
                for y in &mut test.y {
                    let name = &test_classes[*y as usize].0;
                    *y = names.iter().position(|n| n == name).expect("checked above") as i64;
                }
                (all, test)
            }
        };
        let shape = InputShape {
            image: Some(image),
            labels: names,
            ..InputShape::numbers(image.iter().product(), classes.len())
        };
        Ok(Images { train: ImageSet { augment: augment.then_some(seed), ..train }, test, shape })
    }
}

/// The class folders of `dir`, by name, each with its image files by name.
fn class_folders(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, JobsError> {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> JobsError + '_ {
        move |e| data_error(path, None, e.to_string())
    }
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        for file in std::fs::read_dir(&path).map_err(io(&path))? {
            let file = file.map_err(io(&path))?.path();
            let image_ext = file
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"));
            if image_ext && file.is_file() {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Err(data_error(&path, None, "a class folder without PNG or JPEG images".into()));
        }
        files.sort();
        classes.push((name, files));
    }
    classes.sort();
    Ok(classes)
}

/// Every image of `classes`, decoded and resized, numbered by its class's place.
fn decode_all(classes: &[(String, Vec<PathBuf>)], image: [usize; 3]) -> Result<ImageSet, JobsError> {
    let files: Vec<(&PathBuf, i64)> =
        classes.iter().enumerate().flat_map(|(c, (_, files))| files.iter().map(move |f| (f, c as i64))).collect();
    let per_image = image.iter().product::<usize>();
    let mut pixels = vec![0f32; files.len() * per_image];
    // Decoding is the slow part: spread over the cores, each thread a contiguous share.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len().max(1));
    let share = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(share.max(1))
            .zip(pixels.chunks_mut(share.max(1) * per_image))
            .map(|(files, out)| {
                scope.spawn(move || {
                    for ((file, _), out) in files.iter().zip(out.chunks_mut(per_image)) {
                        decode(file, image, out)?;
                    }
                    Ok::<(), JobsError>(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a decoding thread panicked"))
    })?;
    Ok(ImageSet { image, pixels, y: files.iter().map(|(_, c)| *c).collect(), augment: None })
}

/// One image file into `out`: [channels, height, width] in 0..=1.
fn decode(file: &Path, [c, h, w]: [usize; 3], out: &mut [f32]) -> Result<(), JobsError> {
    let bad = |reason: String| data_error(file, None, reason);
    let img = image::ImageReader::open(file)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .decode()
        .map_err(|e| bad(format!("not a PNG or JPEG image that decodes: {e}")))?;
    let img = img.resize_exact(w as u32, h as u32, FilterType::Triangle);
    let raw = match c {
        1 => img.to_luma8().into_raw(),
        _ => img.to_rgb8().into_raw(),
    };
    // Interleaved (height, width, channel) to planes.
    for (i, v) in raw.iter().enumerate() {
        let (pixel, channel) = (i / c, i % c);
        out[channel * h * w + pixel] = f32::from(*v) / 255.0;
    }
    Ok(())
}

/// How fast an image folder goes through the data pipeline on this machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageRates {
    pub images: usize,
    /// Images decoded and resized per second (once per job, on all cores).
    pub decoded_per_s: f64,
    /// Images padded, cropped, flipped and copied into a batch per second (every epoch, on
    /// the loader thread).
    pub augmented_per_s: f64,
}

/// Decodes the folder `dir` (a folder per class) to `image` ([channels, height, width]) as a
/// job would, then augments every image once, timing both.
pub fn image_folder_rates(dir: &Path, image: [usize; 3]) -> Result<ImageRates, JobsError> {
    let began = std::time::Instant::now();
    let classes = class_folders(dir)?;
    let mut set = decode_all(&classes, image)?;
    let decoded = began.elapsed().as_secs_f64();
    set.augment = Some(1);
    let all: Vec<usize> = (0..set.len()).collect();
    let began = std::time::Instant::now();
    let batches: usize = all.chunks(64).map(|b| set.prepare(b, 0).y.len()).sum();
    let augmented = began.elapsed().as_secs_f64();
    Ok(ImageRates {
        images: batches,
        decoded_per_s: batches as f64 / decoded.max(1e-9),
        augmented_per_s: batches as f64 / augmented.max(1e-9),
    })
}

impl ImageSet {
    fn subset(&self, indices: &[usize]) -> ImageSet {
        let per = self.image.iter().product::<usize>();
        ImageSet {
            image: self.image,
            pixels: indices.iter().flat_map(|&i| self.pixels[i * per..(i + 1) * per].iter().copied()).collect(),
            y: indices.iter().map(|&i| self.y[i]).collect(),
            augment: self.augment,
        }
    }

    /// Image `i` as augmentation gives it in `epoch`: padded by an eighth of its smaller side,
    /// cropped back at a random offset, flipped left to right half the time.
    fn augmented(&self, seed: u64, epoch: u32, i: usize, out: &mut Vec<f32>) {
        let [c, h, w] = self.image;
        let src = &self.pixels[i * c * h * w..(i + 1) * c * h * w];
        let mut rng = SplitMix64::for_stream(seed.wrapping_add(AUGMENT_SALT), (u64::from(epoch) << 32) ^ i as u64);
        let pad = (h.min(w) / 8).max(1);
        let (dy, dx) = (rng.below(2 * pad + 1), rng.below(2 * pad + 1));
        let flip = rng.below(2) == 1;
        for plane in src.chunks(h * w) {
            for y in 0..h {
                for x in 0..w {
                    let (sy, sx) = ((y + dy) as isize - pad as isize, (x + dx) as isize - pad as isize);
                    let sx = if flip { w as isize - 1 - sx } else { sx };
                    let inside = (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx);
                    out.push(if inside { plane[sy as usize * w + sx as usize] } else { 0.0 });
                }
            }
        }
    }
}

impl Examples for ImageSet {
    fn len(&self) -> usize {
        self.y.len()
    }

    fn prepare(&self, indices: &[usize], epoch: u32) -> Prepared {
        let per = self.image.iter().product::<usize>();
        let mut values = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            match self.augment {
                Some(seed) => self.augmented(seed, epoch, i, &mut values),
                None => values.extend_from_slice(&self.pixels[i * per..(i + 1) * per]),
            }
        }
        Prepared {
            x: PreparedInput::Numbers { values, rows: indices.len() },
            y: Targets::Classes(indices.iter().map(|&i| self.y[i]).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        img.save(path).unwrap();
    }

    #[test]
    fn folders_are_classes_images_are_resized_and_augmentation_follows_seed_and_epoch() {
        let dir = tempfile::tempdir().unwrap();
        for (class, colour) in [("blue", [0, 0, 255]), ("red", [255, 0, 0])] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..5 {
                write_png(&dir.path().join(class).join(format!("{i}.png")), 12, 6, |x, _| {
                    if x < 6 { colour } else { [0, 0, 0] }
                });
            }
        }
        std::fs::write(dir.path().join("red").join("notes.txt"), "ignored").unwrap();
        let images = Images::read(dir.path(), [3, 4, 8], true, &Holdout::Fraction(0.2), 9).unwrap();
        assert_eq!(images.shape.labels, ["blue", "red"]);
        assert_eq!((images.shape.width, images.shape.image), (96, Some([3, 4, 8])));
        assert_eq!((images.train.len(), images.test.len()), (8, 2));
        // The test side is given as decoded: red's red plane is 1 on the left half, 0 on the right.
        let red = images.test.y.iter().position(|y| *y == 1).or_else(|| images.train.y.iter().position(|y| *y == 1));
        let set = if images.test.y.contains(&1) { &images.test } else { &images.train };
        let Prepared { x: PreparedInput::Numbers { values, .. }, .. } =
            ImageSet { augment: None, ..set.subset(&[red.unwrap()]) }.prepare(&[0], 0)
        else {
            unreachable!()
        };
        // (The resize blends the two pixels at the edge.)
        assert_eq!((values[..3].to_vec(), values[5..8].to_vec()), (vec![1.0; 3], vec![0.0; 3]), "{values:?}");
        // Augmented: the same for the same epoch, different across epochs.
        let batch = |epoch| match images.train.prepare(&[0, 1, 2], epoch).x {
            PreparedInput::Numbers { values, .. } => values,
            PreparedInput::Tokens { .. } => unreachable!(),
        };
        assert_eq!(batch(3), batch(3));
        assert_ne!(batch(3), batch(4));
    }

    #[test]
    fn a_file_that_does_not_decode_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            write_png(&dir.path().join(class).join("ok.png"), 4, 4, |_, _| [9, 9, 9]);
        }
        let broken = dir.path().join("b").join("broken.jpg");
        std::fs::write(&broken, b"\xff\xd8\xff not really a jpeg").unwrap();
        let err = Images::read(dir.path(), [1, 4, 4], false, &Holdout::Fraction(0.5), 1).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!("data set {}: not a PNG or JPEG image that decodes", broken.display())),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let err = Images::read(dir.path(), [1, 4, 4], false, &Holdout::Fraction(0.5), 1).err().unwrap().to_string();
        assert!(err.ends_with("a class folder without PNG or JPEG images"), "{err}");
    }
}
