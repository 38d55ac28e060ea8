//! Every plot renders to PNG and SVG with the bundled font, and the files are real images.
//! Set `OPTLAB_KEEP_PLOTS=DIR` to keep them in DIR for a look.

use std::path::{Path, PathBuf};

use optlab::analysis::{fit_cbs, fit_power_law};
use optlab::plots::*;

fn out_dir() -> (Option<tempfile::TempDir>, PathBuf) {
    match std::env::var_os("OPTLAB_KEEP_PLOTS") {
        Some(dir) => (None, PathBuf::from(dir)),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().to_path_buf();
            (Some(tmp), path)
        }
    }
}

/// Checks a rendered PNG or SVG: the format's signature, a size above a blank canvas, text drawn
/// (SVG), and no temporary file left next to it.
fn check(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
            assert!(
                bytes.len() > 10_000,
                "{}: {} bytes",
                path.display(),
                bytes.len()
            );
        }
        Some("svg") => {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("<svg"), "{}", path.display());
            assert!(text.contains("<text"), "{}: no text", path.display());
            assert!(
                text.contains("<polyline") || text.contains("<circle"),
                "{}",
                path.display()
            );
            assert!(
                text.len() > 5_000,
                "{}: {} bytes",
                path.display(),
                text.len()
            );
        }
        _ => panic!("unexpected file {}", path.display()),
    }
    let dir = path.parent().unwrap();
    let tmp_prefix = format!(".{}.tmp.", path.file_name().unwrap().to_string_lossy());
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(&tmp_prefix),
            "temporary file left: {name}"
        );
    }
}

fn both(dir: &Path, stem: &str, render: impl Fn(&Path) -> optlab::Result<()>) {
    for ext in ["png", "svg"] {
        let path = dir.join(format!("{stem}.{ext}"));
        render(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check(&path);
    }
}

const BATCHES: [f64; 6] = [32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

#[test]
fn loss_curves() {
    let (_keep, dir) = out_dir();
    let curves = BATCHES
        .iter()
        .map(|&bs| LossCurve {
            label: format!("B = {bs}"),
            points: (0..=40)
                .map(|i| {
                    let step = (i * 25) as f64 * 1024.0 / bs;
                    LossPoint {
                        step,
                        tokens: step * bs * 128.0,
                        // Beyond B = 256 a larger batch buys fewer steps per token.
                        loss: 3.0 + 5.0 / (1.0 + step * bs.min(256.0) / 2e4),
                    }
                })
                .collect(),
        })
        .collect();
    let mut data = LossCurves {
        title: "loss vs steps (synthetic)".into(),
        curves,
        target: Some(3.5),
        log_x: false,
    };
    both(&dir, "loss_steps", |p| {
        plot_loss_curves(&data, LossAxis::Steps, p)
    });
    data.title = "loss vs tokens (synthetic)".into();
    data.log_x = true;
    both(&dir, "loss_tokens", |p| {
        plot_loss_curves(&data, LossAxis::Tokens, p)
    });
}

#[test]
fn steps_to_target() {
    let (_keep, dir) = out_dir();
    let series: Vec<StepsSeries> = [("adamw", 900.0, 4e5), ("soap", 500.0, 3e5)]
        .iter()
        .map(|&(name, a, b)| {
            let points: Vec<(f64, f64)> = BATCHES
                .iter()
                .enumerate()
                .map(|(i, &bs)| (bs, (a + b / bs) * (1.0 + 0.03 * ((i % 3) as f64 - 1.0))))
                .collect();
            let fit = fit_cbs(name, &points, 64.0).unwrap();
            StepsSeries {
                label: name.into(),
                points,
                fit: Some(fit),
            }
        })
        .collect();
    let mut data = StepsToTargetPlot {
        title: "steps to target (synthetic)".into(),
        series,
        layout: Layout::Overlaid,
    };
    both(&dir, "steps_overlaid", |p| plot_steps_to_target(&data, p));
    data.layout = Layout::Panels;
    data.series.push(StepsSeries {
        label: "no fit".into(),
        points: vec![(64.0, 100.0), (128.0, 80.0)],
        fit: None,
    });
    both(&dir, "steps_panels", |p| plot_steps_to_target(&data, p));
}

#[test]
fn lr_sensitivity() {
    let (_keep, dir) = out_dir();
    let lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2];
    let series = [
        ("adamw", 3e-3, 0.04),
        ("lion", 3e-4, 0.08),
        ("sgd", 1e-2, 0.2),
    ]
    .iter()
    .map(|&(name, best, width)| LrSeries {
        label: name.into(),
        points: lrs
            .iter()
            .map(|&lr: &f64| {
                let d = (lr / best).ln();
                let loss = if lr > 10.0 * best {
                    f64::NAN // diverged
                } else {
                    3.2 + width * d * d
                };
                (lr, loss)
            })
            .collect(),
        // Seed ranges: ±0.02 around every point (the diverged ones are left out by the plot).
        bars: lrs
            .iter()
            .map(|&lr: &f64| {
                let d = (lr / best).ln();
                let loss = 3.2 + width * d * d;
                (lr, loss - 0.02, loss + 0.02)
            })
            .collect(),
    })
    .collect();
    let data = LrSensitivityPlot {
        title: "final loss vs learning rate (synthetic)".into(),
        series,
        max_loss: Some(4.0),
    };
    both(&dir, "lr", |p| plot_lr_sensitivity(&data, p));
}

#[test]
fn b_star_scaling() {
    let (_keep, dir) = out_dir();
    let points: Vec<ScalingPoint> = [2.4e6, 9.4e6, 1.9e7, 4.2e7]
        .iter()
        .enumerate()
        .map(|(i, &n): (usize, &f64)| ScalingPoint {
            label: format!("model {i}"),
            x: n,
            b_star: 93.2 * (n / 1e6).powf(0.47) * (1.0 + 0.05 * (i as f64 - 1.5)),
        })
        .collect();
    let fit = fit_power_law(
        "B* vs n_params",
        &points.iter().map(|p| (p.x, p.b_star)).collect::<Vec<_>>(),
    )
    .unwrap();
    let data = BStarScalingPlot {
        title: "critical batch size vs model size (synthetic)".into(),
        x_label: "non-embedding parameters N".into(),
        points,
        fit: Some(fit),
    };
    both(&dir, "b_star_n", |p| plot_b_star_scaling(&data, p));
}

#[test]
fn empty_data_still_renders() {
    let (_keep, dir) = out_dir();
    let path = dir.join("empty.svg");
    plot_steps_to_target(&StepsToTargetPlot::default(), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("no data to plot"));
}
