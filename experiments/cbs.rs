//! Critical-batch-size analysis of steps-to-target data:
//! `cbs fit --csv FILE [--b0 256] [--json] [--plot OUT_PREFIX]`.
//!
//! The CSV has a header naming the columns `group,batch_size,steps` and optionally
//! `n_params,tokens`, in any order. Per group it fits `S(B) = a + b/B` on `log S` and reports
//! `a`, `b`, `B* = 1.2·B0 + b/(5a)` and `b/(5a)`; across groups, the power laws of `B*` against
//! `n_params` and `tokens` when at least two groups give distinct values.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use optlab::analysis::cbs::{CbsReport, DEFAULT_B0};
use optlab::analysis::csv::read_cbs_csv;
use optlab::analysis::{analyze, GroupFit, PowerLaw};
use optlab::plots::{
    plot_b_star_scaling, plot_steps_to_target, BStarScalingPlot, Layout, ScalingPoint, StepsSeries,
    StepsToTargetPlot,
};

/// Critical-batch-size analysis of steps-to-target data.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit S(B) = a + b/B per group and report the critical batch size B*.
    Fit {
        /// CSV with columns group,batch_size,steps[,n_params,tokens] (any order; `#` lines
        /// are comments).
        #[arg(long)]
        csv: PathBuf,
        /// Reference batch size B0 of the linear-scaling line (same unit as batch_size).
        #[arg(long, default_value_t = DEFAULT_B0)]
        b0: f64,
        /// Print the JSON summary instead of the table.
        #[arg(long)]
        json: bool,
        /// Write plots (PNG and SVG) to OUT_PREFIX-steps.*, OUT_PREFIX-bstar-*.*; a prefix
        /// ending in `/` or naming a directory puts them inside it.
        #[arg(long, value_name = "OUT_PREFIX")]
        plot: Option<String>,
    },
}

fn main() -> ExitCode {
    let Command::Fit {
        csv,
        b0,
        json,
        plot,
    } = Args::parse().command;
    match fit(&csv, b0, json, plot.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fit(csv: &Path, b0: f64, json: bool, plot: Option<&str>) -> optlab::Result<()> {
    let rows = read_cbs_csv(csv)?;
    let report = analyze(&rows, b0)?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if let Some(prefix) = plot {
        let written = write_plots(&report, prefix)?;
        // Keep stdout pure JSON when JSON was asked for.
        for path in written {
            if json {
                eprintln!("wrote {}", path.display());
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// `prefix` + `name`: inside the directory when `prefix` is one, else joined with `-`.
fn output(prefix: &str, name: &str) -> PathBuf {
    if prefix.ends_with('/') || Path::new(prefix).is_dir() {
        Path::new(prefix).join(name)
    } else {
        PathBuf::from(format!("{prefix}-{name}"))
    }
}

fn write_plots(report: &CbsReport, prefix: &str) -> optlab::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let series: Vec<StepsSeries> = report
        .groups
        .iter()
        .map(|g| StepsSeries {
            label: g.group.clone(),
            points: g.points.clone(),
            fit: Some(g.fit),
        })
        .collect();
    let mut steps = StepsToTargetPlot {
        title: format!("steps to target vs batch size (B0 = {})", report.b0),
        series,
        layout: Layout::Panels,
    };
    let mut figures = vec![("steps", steps.clone())];
    if report.groups.len() > 1 {
        steps.layout = Layout::Overlaid;
        figures.push(("steps-overlaid", steps));
    }
    for (name, data) in &figures {
        for ext in ["png", "svg"] {
            let path = output(prefix, &format!("{name}.{ext}"));
            plot_steps_to_target(data, &path)?;
            written.push(path);
        }
    }
    /// Which column of a group a power law is against.
    type Column = fn(&GroupFit) -> Option<f64>;
    let laws: [(&str, &str, Option<PowerLaw>, Column); 2] = [
        (
            "n_params",
            "model size N (n_params)",
            report.power_laws.n_params,
            |g| g.n_params,
        ),
        (
            "tokens",
            "data size D (tokens)",
            report.power_laws.tokens,
            |g| g.tokens,
        ),
    ];
    for (key, x_label, law, x) in laws {
        let Some(law) = law else { continue };
        let data = BStarScalingPlot {
            title: format!("critical batch size vs {key}"),
            x_label: x_label.into(),
            points: report
                .groups
                .iter()
                .filter_map(|g| {
                    x(g).map(|x| ScalingPoint {
                        label: g.group.clone(),
                        x,
                        b_star: g.fit.b_star,
                    })
                })
                .collect(),
            fit: Some(law),
        };
        for ext in ["png", "svg"] {
            let path = output(prefix, &format!("bstar-{key}.{ext}"));
            plot_b_star_scaling(&data, &path)?;
            written.push(path);
        }
    }
    Ok(written)
}
