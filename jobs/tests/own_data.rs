//! The runtime on the user's own data and sized models: a CSV table and a text corpus, each
//! trained to a stated accuracy or loss, a bad file refused with its name and line, and a
//! trained table model served on the held-out file's raw rows as it was evaluated.

use std::path::{Path, PathBuf};

use gantry_core::spec::{DatasetSpec, Holdout, ModelKind, ModelSpec, TrainSpec};
use gantry_jobs::{Predictor, RunEnv, train};

/// Three classes of points around well-apart centres, in four columns of very different
/// scales (standardisation must make them comparable), with named labels.
fn blobs(rows: usize, seed: u64) -> String {
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    let centres = [[0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 2.0], [-3.0, 2.0, -1.0, 3.0]];
    let scales = [1.0, 10.0, 1000.0, 0.01];
    let mut csv = String::from("width,height,mass,ratio,species\n");
    for i in 0..rows {
        let class = i % 3;
        let values: Vec<String> =
            (0..4).map(|c| format!("{:.4}", (centres[class][c] + 1.2 * noise()) * scales[c])).collect();
        csv.push_str(&format!("{},{}\n", values.join(","), ["fern", "moss", "oak"][class]));
    }
    csv
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(spec: &TrainSpec, checkpoints: Option<&Path>) -> (Result<gantry_jobs::Outcome, gantry_jobs::JobsError>, String) {
    let env = RunEnv {
        job_id: Some("own-data".into()),
        checkpoint_dir: checkpoints.map(Path::to_path_buf),
        ..RunEnv::default()
    };
    let mut out = Vec::new();
    let outcome = train(spec, &env, &mut out);
    (outcome, String::from_utf8(out).unwrap())
}

/// A valid spec's run, which must succeed: its outcome and output (printed, for the figures).
fn trained(spec: &TrainSpec, checkpoints: Option<&Path>) -> (gantry_jobs::Outcome, String) {
    spec.validate().unwrap();
    let (outcome, out) = run(spec, checkpoints);
    println!("{out}");
    (outcome.unwrap(), out)
}

/// An MLP of `hidden` widths trained on table file `train` and tested on `test`, predicting
/// `column` (a number with `regression`, else a class), at learning rate 0.01.
fn table_spec(train: &Path, test: &Path, column: &str, regression: bool, hidden: Vec<u32>, epochs: u32) -> TrainSpec {
    TrainSpec {
        model: ModelSpec { hidden: Some(hidden), ..ModelSpec::of(ModelKind::Mlp) },
        dataset: DatasetSpec::Table {
            path: train.display().to_string(),
            label: column.into(),
            holdout: Holdout::File(test.display().to_string()),
            regression,
        },
        epochs,
        batch_size: if regression { 16 } else { 32 },
        learning_rate: 0.01,
        ..TrainSpec::default()
    }
}

#[test]
fn a_csv_table_trains_a_sized_mlp_and_is_served_on_raw_rows_as_it_was_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let train_csv = write(dir.path(), "train.csv", &blobs(240, 1));
    let test_csv = write(dir.path(), "test.csv", &blobs(90, 2));
    let spec = table_spec(&train_csv, &test_csv, "species", false, vec![32, 16], 15);
    let (outcome, out) = trained(&spec, Some(&dir.path().join("ckpt")));
    // 4x32 + 32 + 32x16 + 16 + 16x3 + 3 weights.
    assert!(out.starts_with("start model=mlp(hidden=32x16) dataset=table:"), "{out}");
    assert!(out.lines().next().unwrap().contains(" params=739 train_samples=240 test_samples=90 "), "{out}");
    assert!(outcome.test_accuracy >= 0.95, "{outcome:?}");

    // The served model reads the test file's rows as written: the checkpoint scales them.
    let predictor = Predictor::load(outcome.last_checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!((predictor.input_width(), predictor.classes()), (Some(4), 3));
    assert_eq!(predictor.input().labels, ["fern", "moss", "oak"]);
    let text = std::fs::read_to_string(&test_csv).unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        x.extend(fields[..4].iter().map(|v| v.parse::<f32>().unwrap()));
        y.push(predictor.input().labels.iter().position(|l| l == fields[4]).unwrap());
    }
    let probs = predictor.predict_pixels(y.len(), &x).unwrap();
    let correct = probs
        .chunks(3)
        .zip(&y)
        .filter(|(row, label)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 == **label)
        .count();
    assert_eq!(correct as f64 / y.len() as f64, outcome.test_accuracy);

    // A restart of this job with other sizes is refused, naming both models.
    let resized = TrainSpec { model: ModelSpec { hidden: Some(vec![8]), ..ModelSpec::of(ModelKind::Mlp) }, ..spec };
    let env =
        RunEnv { job_id: Some("own-data".into()), resume_dir: outcome.last_checkpoint.clone(), ..RunEnv::default() };
    let err = train(&resized, &env, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.ends_with("it holds mlp(hidden=32x16), this job's model is mlp(hidden=8)"), "{err}");
}

/// Homes: three columns at very different scales and a price that is a fixed linear
/// combination of them plus a little noise.
fn homes(rows: usize, seed: u64) -> String {
    let mut state = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    let mut csv = String::from("rooms,area,age,price\n");
    for _ in 0..rows {
        let (rooms, area, age) = (3.0 + 4.0 * noise(), 150.0 + 200.0 * noise(), 0.5 + noise());
        let price = 20.0 * rooms + 1.5 * area - 60.0 * age + 4.0 * noise();
        csv.push_str(&format!("{rooms:.3},{area:.2},{age:.4},{price:.2}\n"));
    }
    csv
}

#[test]
fn a_regression_table_predicts_its_target_on_held_out_rows() {
    let dir = tempfile::tempdir().unwrap();
    let train_csv = write(dir.path(), "train.csv", &homes(240, 5));
    let test_csv = write(dir.path(), "test.csv", &homes(90, 6));
    let spec = table_spec(&train_csv, &test_csv, "price", true, vec![32], 30);
    let (outcome, out) = trained(&spec, Some(&dir.path().join("ckpt")));
    // 3x32 + 32 + 32x1 + 1 weights: one output.
    assert!(out.lines().next().unwrap().contains(" params=161 "), "{out}");
    let done = out.lines().find(|l| l.starts_with("done ")).unwrap();
    assert!(done.contains(" test_r2="), "{done}");
    // The noise is about 1% of the price's spread: a good fit explains nearly all of it.
    assert!(outcome.test_accuracy >= 0.95, "R² {}", outcome.test_accuracy);
    // Served, it reads raw rows and answers in the target's units, as evaluated.
    let predictor = Predictor::load(outcome.last_checkpoint.as_ref().unwrap()).unwrap();
    assert!(predictor.is_regression());
    let text = std::fs::read_to_string(&test_csv).unwrap();
    let (mut x, mut prices) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let fields: Vec<f32> = line.split(',').map(|v| v.parse().unwrap()).collect();
        x.extend_from_slice(&fields[..3]);
        prices.push(fields[3]);
    }
    let predicted = predictor.predict_pixels(prices.len(), &x).unwrap();
    let mean = prices.iter().sum::<f32>() / prices.len() as f32;
    let sse: f32 = predicted.iter().zip(&prices).map(|(p, a)| (p - a).powi(2)).sum();
    let sst: f32 = prices.iter().map(|a| (a - mean).powi(2)).sum();
    let r2 = f64::from(1.0 - sse / sst);
    assert!((r2 - outcome.test_accuracy).abs() < 1e-3, "served R² {r2}, evaluated {}", outcome.test_accuracy);
}

/// Converts a CSV file to Parquet with pyarrow (as pandas writes them), compressed with `codec`.
fn to_parquet(csv: &Path, codec: &str) -> PathBuf {
    let out = csv.with_extension("parquet");
    let script = format!(
        "import pyarrow.csv as c, pyarrow.parquet as p; p.write_table(c.read_csv({csv:?}), {out:?}, compression={codec:?})",
        csv = csv.display().to_string(),
        out = out.display().to_string(),
    );
    let status = std::process::Command::new("python3").args(["-c", &script]).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "python3 with pyarrow writes the Parquet files of this test: pip install pyarrow (.ci/run does)"
    );
    out
}

#[test]
fn a_parquet_table_trains_as_its_csv_does_and_a_null_is_refused_with_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let train = to_parquet(&write(dir.path(), "train.csv", &blobs(240, 1)), "snappy");
    let test = to_parquet(&write(dir.path(), "test.csv", &blobs(90, 2)), "zstd");
    let spec = table_spec(&train, &test, "species", false, vec![32, 16], 15);
    let (outcome, out) = trained(&spec, None);
    assert!(out.lines().next().unwrap().contains(" params=739 train_samples=240 test_samples=90 "), "{out}");
    assert!(outcome.test_accuracy >= 0.95, "{outcome:?}");

    let holes = write(dir.path(), "holes.csv", "a,b,y\n1.5,2,x\n2.5,,y\n");
    let holes = to_parquet(&holes, "snappy");
    let spec = TrainSpec {
        dataset: DatasetSpec::Table {
            path: holes.display().to_string(),
            label: "y".into(),
            holdout: Holdout::Fraction(0.5),
            regression: false,
        },
        ..spec
    };
    let err = run(&spec, None).0.unwrap_err().to_string();
    assert_eq!(err, format!("data set {} row 2: column `b`: `null` is not a finite number", holes.display()));
}

#[test]
fn a_text_corpus_trains_a_sized_transformer_with_its_tail_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let verse = "Twinkle, twinkle, little star,\nHow I wonder what you are!\nUp above the world so high,\nLike a diamond in the sky.\n";
    let corpus = write(dir.path(), "rhyme.txt", &verse.repeat(60));
    let spec = TrainSpec {
        model: ModelSpec {
            layers: Some(1),
            width: Some(32),
            heads: Some(2),
            context: Some(32),
            ..ModelSpec::of(ModelKind::Transformer)
        },
        dataset: DatasetSpec::Text { path: corpus.display().to_string(), holdout: Holdout::Fraction(0.2) },
        epochs: 6,
        batch_size: 16,
        learning_rate: 0.01,
        ..TrainSpec::default()
    };
    let (outcome, out) = trained(&spec, None);
    assert!(out.starts_with("start model=transformer(layers=1,width=32,heads=2,context=32) dataset=text:"), "{out}");
    // A uniform guess over 96 characters is ln 96 = 4.56 nats; the rhyme repeats, so a model
    // that learnt it predicts most next characters.
    assert!(outcome.test_loss < 0.8, "{outcome:?}");
}

#[test]
fn a_data_file_that_does_not_parse_is_refused_with_its_name_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(dir.path(), "bad.csv", "a,b,label\n1,2,x\n3,oops,y\n");
    let spec = TrainSpec {
        dataset: DatasetSpec::Table {
            path: csv.display().to_string(),
            label: "label".into(),
            holdout: Holdout::Fraction(0.5),
            regression: false,
        },
        ..TrainSpec::default()
    };
    let (outcome, out) = run(&spec, None);
    let err = outcome.unwrap_err().to_string();
    assert_eq!(err, format!("data set {} line 3: column `b`: `oops` is not a finite number", csv.display()));
    assert!(out.is_empty(), "nothing trained: {out}");
    let spec = TrainSpec {
        model: ModelSpec::of(ModelKind::Transformer),
        dataset: DatasetSpec::Text {
            path: dir.path().join("none.txt").display().to_string(),
            holdout: Holdout::Fraction(0.5),
        },
        ..TrainSpec::default()
    };
    let err = run(&spec, None).0.unwrap_err().to_string();
    assert!(err.starts_with(&format!("data set {}: ", dir.path().join("none.txt").display())), "{err}");
}

/// Stripes across, stripes down, or a checkerboard, in a random colour and phase with noise:
/// a class is an orientation, which crops and flips keep. Drawn at 32x32 with stripes 6 to 8
/// pixels wide, so that they are still stripes once resized to 16x16.
fn pattern(class: usize, i: u64, side: u32) -> image::RgbImage {
    let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ class as u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as u32
    };
    let (colour, phase, period) =
        ([next() % 200 + 55, next() % 200 + 55, next() % 200 + 55], next() % 8, 6 + next() % 3);
    image::RgbImage::from_fn(side, side, |x, y| {
        let on = match class {
            0 => (y + phase) / period % 2 == 0,
            1 => (x + phase) / period % 2 == 0,
            _ => ((x + phase) / period + y / period) % 2 == 0,
        };
        let noise = (next() % 30) as u8;
        image::Rgb(colour.map(|c| if on { c as u8 - noise.min(c as u8) } else { noise }))
    })
}

#[test]
fn an_image_folder_trains_a_sized_cnn_with_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ["across", "down", "squares"];
    for (split, count, offset) in [("train", 60u64, 0u64), ("test", 15, 1000)] {
        for (c, name) in classes.iter().enumerate() {
            let folder = dir.path().join(split).join(name);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..count {
                // PNG and JPEG both.
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                // Larger than the size trained at: resized on the way in.
                pattern(c, offset + i, 32).save(folder.join(format!("{i}.{ext}"))).unwrap();
            }
        }
    }
    let spec = TrainSpec {
        model: ModelSpec { channels: Some(vec![8, 16]), ..ModelSpec::of(ModelKind::Cnn) },
        dataset: DatasetSpec::Images {
            path: dir.path().join("train").display().to_string(),
            size: [16, 16],
            augment: true,
            holdout: Holdout::File(dir.path().join("test").display().to_string()),
        },
        epochs: 15,
        batch_size: 16,
        learning_rate: 0.003,
        ..TrainSpec::default()
    };
    let (outcome, out) = trained(&spec, Some(&dir.path().join("ckpt")));
    assert!(out.starts_with("start model=cnn(channels=8x16) dataset=images:"), "{out}");
    assert!(out.lines().next().unwrap().contains(" train_samples=180 test_samples=45 "), "{out}");
    // Measured: 39 of the 45 held-out images (0.87); chance is a third.
    assert!(outcome.test_accuracy >= 0.8, "{outcome:?}");
    let predictor = Predictor::load(outcome.last_checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!((predictor.input_width(), predictor.classes()), (Some(3 * 16 * 16), 3));
    assert_eq!(predictor.input().labels, classes);
}
