//! Plots of batch-size sweeps, as PNG or SVG (chosen by the file extension).
//!
//! Each plot takes a plain data struct, so any caller (the `cbs` binary, a sweep report) can
//! fill it from its own records:
//!
//! - [`plot_loss_curves`]: loss against steps or tokens, one line per batch size;
//! - [`plot_steps_to_target`]: steps to target against batch size on log-log axes, with the fit
//!   `a + b/B`, linear scaling from `B0` and `B*` marked, overlaid or one panel per group;
//! - [`plot_lr_sensitivity`]: final loss against learning rate per optimizer, each aligned at its
//!   own optimum (x = lr / best lr, log scale), the view of Zhao et al., "Deconstructing What
//!   Makes a Good Optimizer for Language Models";
//! - [`plot_b_star_scaling`]: `B*` against model or data size with its power-law fit.
//!
//! Text is drawn with DejaVu Sans compiled into the crate (`assets/fonts`), so plots render the
//! same on any machine, with no system fonts, fontconfig or freetype; on bitmaps each glyph is
//! placed by the font's metrics (`plots/text.rs`), not by plotters' glyph placement. Files are written atomically:
//! a crash leaves the previous file or the new one, never a torn one. Non-finite values and, on
//! log axes, non-positive values are left out of the plot; lines are clipped to the axes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::{CbsFit, PowerLaw};
use crate::error::{Error, Result};

mod text;

/// The bundled font: DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/fonts`).
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The family name the bundled font is registered under (the only one the plots use).
const FONT_FAMILY: &str = "sans-serif";

/// Registers the bundled font as plotters' `sans-serif`, once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Msg(
            "plots: the bundled font DejaVuSans.ttf could not be loaded".into(),
        ))
    }
}

/// Ten distinguishable line colours (the common "tab10" set).
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// One point of a loss curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossPoint {
    /// Optimizer steps taken.
    pub step: f64,
    /// Tokens seen.
    pub tokens: f64,
    /// Loss at that point.
    pub loss: f64,
}

/// One loss curve (one run, typically one batch size).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossCurve {
    /// Legend entry, e.g. `B = 256`.
    pub label: String,
    /// The points, in any order (drawn sorted by the x axis).
    pub points: Vec<LossPoint>,
}

/// Loss curves of a sweep.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossCurves {
    /// Plot title.
    pub title: String,
    /// One curve per batch size.
    pub curves: Vec<LossCurve>,
    /// A target loss, drawn as a horizontal dashed line.
    pub target: Option<f64>,
    /// Log-scale x axis (useful when batch sizes run very different step counts).
    pub log_x: bool,
}

/// The x axis of [`plot_loss_curves`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossAxis {
    /// Optimizer steps.
    Steps,
    /// Tokens seen.
    Tokens,
}

/// Steps to target of one group (an optimizer, a model size...) at each batch size.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepsSeries {
    /// Group name.
    pub label: String,
    /// `(batch_size, steps)` points.
    pub points: Vec<(f64, f64)>,
    /// The group's fit; draws `a + b/B`, linear scaling from `B0` and `B*`.
    pub fit: Option<CbsFit>,
}

/// How several groups share a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// All groups on one pair of axes.
    #[default]
    Overlaid,
    /// One panel per group, on a grid.
    Panels,
}

/// Steps to target against batch size.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepsToTargetPlot {
    /// Plot title.
    pub title: String,
    /// One series per group.
    pub series: Vec<StepsSeries>,
    /// Overlaid or one panel per group.
    pub layout: Layout,
}

/// Final loss against learning rate for one optimizer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LrSeries {
    /// Optimizer name.
    pub label: String,
    /// `(lr, final_loss)` points; diverged runs may carry a non-finite loss (left out).
    pub points: Vec<(f64, f64)>,
    /// Error bars `(lr, low, high)`, e.g. the range over seeds (empty: none); bars at an lr
    /// without a finite point, or with a non-finite end, are left out.
    pub bars: Vec<(f64, f64, f64)>,
}

/// Final loss against learning rate, each optimizer aligned at its best learning rate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LrSensitivityPlot {
    /// Plot title.
    pub title: String,
    /// One series per optimizer.
    pub series: Vec<LrSeries>,
    /// Upper limit of the loss axis, so a few bad runs do not flatten the rest; lines are
    /// clipped there. `None`: the largest finite loss.
    pub max_loss: Option<f64>,
}

/// One group's critical batch size at its model or data size.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScalingPoint {
    /// Group name.
    pub label: String,
    /// Model size or data size.
    pub x: f64,
    /// Its critical batch size.
    pub b_star: f64,
}

/// `B*` against model or data size, with the power-law fit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BStarScalingPlot {
    /// Plot title.
    pub title: String,
    /// What x is, e.g. `non-embedding parameters N`.
    pub x_label: String,
    /// One point per group.
    pub points: Vec<ScalingPoint>,
    /// The fit `B* = c·x^e`.
    pub fit: Option<PowerLaw>,
}

/// Draws loss against steps or tokens, one line per curve, to `path` (`.png` or `.svg`).
pub fn plot_loss_curves(data: &LossCurves, axis: LossAxis, path: &Path) -> Result<()> {
    save(&LossFigure { data, axis }, path)
}

/// Draws steps to target against batch size (log-log) to `path` (`.png` or `.svg`).
pub fn plot_steps_to_target(data: &StepsToTargetPlot, path: &Path) -> Result<()> {
    save(&StepsFigure { data }, path)
}

/// Draws final loss against lr / best lr (log x) per optimizer to `path` (`.png` or `.svg`).
pub fn plot_lr_sensitivity(data: &LrSensitivityPlot, path: &Path) -> Result<()> {
    save(&LrFigure { data }, path)
}

/// Draws `B*` against model or data size (log-log) with its fit to `path` (`.png` or `.svg`).
pub fn plot_b_star_scaling(data: &BStarScalingPlot, path: &Path) -> Result<()> {
    save(&ScalingFigure { data }, path)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// A figure that can draw itself on any backend.
trait Figure {
    fn size(&self) -> (u32, u32) {
        (1000, 700)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// Renders `fig` to `path`, the format chosen by its extension, atomically.
fn save(fig: &impl Figure, path: &Path) -> Result<()> {
    register_font()?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let fail = |e: &dyn std::fmt::Display| Error::file(path, format!("plot: {e}"));
    match ext.as_deref() {
        Some("svg") => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, fig.size()).into_drawing_area();
                root.fill(&WHITE).map_err(|e| fail(&e))?;
                fig.draw(&root).map_err(|e| fail(&e))?;
                root.present().map_err(|e| fail(&e))?;
            }
            crate::io::write_atomic(path, svg.as_bytes())
        }
        Some("png") => {
            let tmp = temp_path(path)?;
            let rendered = (|| -> DrawResult {
                {
                    let bitmap = BitMapBackend::new(&tmp, fig.size());
                    let root = text::MetricText(bitmap).into_drawing_area();
                    root.fill(&WHITE)?;
                    fig.draw(&root)?;
                    root.present()?;
                }
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, path)?;
                Ok(())
            })();
            rendered.map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                fail(&e)
            })
        }
        _ => Err(Error::file(
            path,
            "plot: unknown format (the file name must end in .png or .svg)",
        )),
    }
}

/// A fresh temporary path next to `path` that keeps its extension (the bitmap backend picks the
/// encoder from it).
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?
        .to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.tmp.{}-{n}.png", std::process::id())))
}

// ------------------------------------------------------------------------------------------------
// Ranges, ticks, clipping

/// `[lo, hi]` covering `values` (finite ones; positive ones on a log axis), padded, or `None` if
/// there is nothing to cover.
fn span(values: impl IntoIterator<Item = f64>, log: bool) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        if v.is_finite() && (!log || v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if lo > hi {
        return None;
    }
    let padded = if log {
        let pad = ((hi / lo).ln() * 0.06).max(0.1).exp();
        (lo / pad, hi * pad)
    } else {
        let pad = if hi > lo {
            (hi - lo) * 0.05
        } else {
            lo.abs().max(1.0) * 0.05
        };
        (lo - pad, hi + pad)
    };
    // Values near the ends of f64 overflow the padding: then the range is the values' own.
    let usable = padded.0.is_finite() && padded.1.is_finite() && (!log || padded.0 > 0.0);
    Some(if usable { padded } else { (lo, hi) })
}

/// A number for a tick or a legend: 4 significant digits, trailing zeros dropped, scientific
/// outside `[1e-3, 1e6)`.
fn tick(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (1e-3..1e6).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        trim(format!("{x:.decimals$}"))
    } else {
        let s = format!("{x:.3e}");
        let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{exponent}", trim(mantissa.to_string()))
    }
}

/// Tick positions of a log axis: 1, 2, 5 × 10^k inside `[lo, hi]`, every integer mantissa when
/// that gives fewer than 3, powers of ten only (and every n-th decade) over many decades.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    // Finite positive bounds: both exponents lie within [-324, 309].
    let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let within = |mantissas: &[f64], every: i32| -> Vec<f64> {
        (k0..=k1)
            .filter(|k| k.rem_euclid(every) == 0)
            .flat_map(|k| mantissas.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    };
    let decades = k1 - k0;
    if decades > 4 {
        return within(&[1.0], (decades + 9) / 10);
    }
    let ticks = within(&[1.0, 2.0, 5.0], 1);
    if ticks.len() >= 3 {
        return ticks;
    }
    let ticks = within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1);
    if ticks.len() >= 3 {
        return ticks;
    }
    // Less than a decade: tenths of the mantissa, at most about ten of them.
    let tenths: Vec<f64> = (10..100).map(|m| m as f64 / 10.0).collect();
    let ticks = within(&tenths, 1);
    let every = ticks.len().div_ceil(10).max(1);
    ticks.into_iter().step_by(every).collect()
}

/// `n` points spread evenly (geometrically when `log`) over `[lo, hi]`.
fn samples(lo: f64, hi: f64, n: usize, log: bool) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| {
        let f = i as f64 / (n - 1) as f64;
        if log {
            (lo.ln() + f * (hi.ln() - lo.ln())).exp()
        } else {
            lo + f * (hi - lo)
        }
    })
}

/// An axis: its range and scale, for clipping.
#[derive(Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn unit(self, v: f64) -> f64 {
        if self.log {
            v.ln()
        } else {
            v
        }
    }
    fn value(self, u: f64) -> f64 {
        if self.log {
            u.exp()
        } else {
            u
        }
    }
    fn valid(self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }
}

/// Clips a polyline to the box `x × y` (in axis units, so straight on screen), returning the
/// visible runs. Points that cannot be placed on an axis break the line.
fn clip(points: &[(f64, f64)], x: Axis, y: Axis) -> Vec<Vec<(f64, f64)>> {
    let (x0, x1, y0, y1) = (x.unit(x.lo), x.unit(x.hi), y.unit(y.lo), y.unit(y.hi));
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    let mut flush = |current: &mut Vec<(f64, f64)>| {
        if current.len() >= 2 {
            runs.push(std::mem::take(current));
        } else {
            current.clear();
        }
    };
    for pair in points.windows(2) {
        let (p, q) = (pair[0], pair[1]);
        if !(x.valid(p.0) && y.valid(p.1) && x.valid(q.0) && y.valid(q.1)) {
            flush(&mut current);
            continue;
        }
        let (px, py, qx, qy) = (x.unit(p.0), y.unit(p.1), x.unit(q.0), y.unit(q.1));
        // Liang-Barsky.
        let (dx, dy) = (qx - px, qy - py);
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        let mut visible = true;
        for (pk, qk) in [(-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)] {
            if pk == 0.0 {
                if qk < 0.0 {
                    visible = false;
                }
            } else {
                let r = qk / pk;
                if pk < 0.0 {
                    t0 = t0.max(r);
                } else {
                    t1 = t1.min(r);
                }
            }
        }
        if !visible || t0 > t1 {
            flush(&mut current);
            continue;
        }
        let a = (x.value(px + t0 * dx), y.value(py + t0 * dy));
        let b = (x.value(px + t1 * dx), y.value(py + t1 * dy));
        if t0 > 0.0 || current.is_empty() {
            flush(&mut current);
            current.push(a);
        }
        current.push(b);
        if t1 < 1.0 {
            flush(&mut current);
        }
    }
    flush(&mut current);
    runs
}

/// Keeps the points that lie inside the box.
fn inside(points: &[(f64, f64)], x: Axis, y: Axis) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|&(a, b)| {
            x.valid(a) && y.valid(b) && a >= x.lo && a <= x.hi && b >= y.lo && b <= y.hi
        })
        .collect()
}

const CAPTION: (&str, u32) = (FONT_FAMILY, 26);
const LABEL: (&str, u32) = (FONT_FAMILY, 18);
const LEGEND: (&str, u32) = (FONT_FAMILY, 15);

/// Draws an empty chart with a message, for plots with no data.
fn empty<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.titled(title, CAPTION)?.draw(&Text::new(
        "no data to plot",
        (40, 40),
        LABEL.into_font(),
    ))?;
    Ok(())
}

/// A chart's axes: the ranges with a log or linear scale on each, so one drawing routine serves
/// every combination.
macro_rules! with_chart {
    ($area:expr, $caption:expr, $x:expr, $y:expr, $xdesc:expr, $ydesc:expr, |$chart:ident| $body:block) => {{
        let (x, y): (Axis, Axis) = ($x, $y);
        let mut builder = ChartBuilder::on($area);
        builder
            .caption($caption, CAPTION)
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(80);
        macro_rules! body {
            ($c:ident) => {{
                let mut $chart = $c;
                $chart
                    .configure_mesh()
                    .x_desc($xdesc)
                    .y_desc($ydesc)
                    .axis_desc_style(LABEL)
                    .label_style(LEGEND)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .light_line_style(WHITE.mix(0.0))
                    .draw()?;
                $body
            }};
        }
        match (x.log, y.log) {
            (true, true) => {
                let c = builder.build_cartesian_2d(
                    (x.lo..x.hi)
                        .log_scale()
                        .with_key_points(log_ticks(x.lo, x.hi)),
                    (y.lo..y.hi)
                        .log_scale()
                        .with_key_points(log_ticks(y.lo, y.hi)),
                )?;
                body!(c)
            }
            (true, false) => {
                let c = builder.build_cartesian_2d(
                    (x.lo..x.hi)
                        .log_scale()
                        .with_key_points(log_ticks(x.lo, x.hi)),
                    y.lo..y.hi,
                )?;
                body!(c)
            }
            (false, true) => {
                let c = builder.build_cartesian_2d(
                    x.lo..x.hi,
                    (y.lo..y.hi)
                        .log_scale()
                        .with_key_points(log_ticks(y.lo, y.hi)),
                )?;
                body!(c)
            }
            (false, false) => {
                let c = builder.build_cartesian_2d(x.lo..x.hi, y.lo..y.hi)?;
                body!(c)
            }
        }
    }};
}

/// Draws the legend box of a chart.
macro_rules! legend {
    ($chart:ident, $pos:expr) => {
        $chart
            .configure_series_labels()
            .position($pos)
            .label_font(LEGEND)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .draw()?
    };
}

// ------------------------------------------------------------------------------------------------
// (a) loss curves

struct LossFigure<'a> {
    data: &'a LossCurves,
    axis: LossAxis,
}

impl Figure for LossFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let d = self.data;
        let xv = |p: &LossPoint| match self.axis {
            LossAxis::Steps => p.step,
            LossAxis::Tokens => p.tokens,
        };
        let curves: Vec<(&str, Vec<(f64, f64)>)> = d
            .curves
            .iter()
            .map(|c| {
                let mut pts: Vec<(f64, f64)> = c.points.iter().map(|p| (xv(p), p.loss)).collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (c.label.as_str(), pts)
            })
            .collect();
        let all = || curves.iter().flat_map(|c| c.1.iter());
        let xs = span(all().map(|p| p.0), d.log_x);
        let ys = span(all().map(|p| p.1).chain(d.target), false);
        let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
            return empty(root, &d.title);
        };
        let x = Axis {
            lo: x0,
            hi: x1,
            log: d.log_x,
        };
        let y = Axis {
            lo: y0,
            hi: y1,
            log: false,
        };
        let xdesc = match self.axis {
            LossAxis::Steps => "steps",
            LossAxis::Tokens => "tokens",
        };
        with_chart!(root, &d.title, x, y, xdesc, "loss", |chart| {
            for (i, (label, pts)) in curves.iter().enumerate() {
                let c = color(i);
                for (k, run) in clip(pts, x, y).into_iter().enumerate() {
                    let s = chart.draw_series(LineSeries::new(run, c.stroke_width(2)))?;
                    if k == 0 {
                        s.label(*label).legend(move |(px, py)| {
                            PathElement::new(vec![(px, py), (px + 20, py)], c.stroke_width(2))
                        });
                    }
                }
            }
            if let Some(t) = d.target {
                let line = vec![(x.lo, t), (x.hi, t)];
                chart
                    .draw_series(DashedLineSeries::new(line, 8, 6, BLACK.stroke_width(1)))?
                    .label(format!("target {}", tick(t)))
                    .legend(|(px, py)| {
                        PathElement::new(vec![(px, py), (px + 20, py)], BLACK.stroke_width(1))
                    });
            }
            legend!(chart, SeriesLabelPosition::UpperRight);
        });
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// (b) steps to target vs batch size

struct StepsFigure<'a> {
    data: &'a StepsToTargetPlot,
}

/// The batch sizes a fit's decorations reach: `B0` and `B*`, the latter only when it is within
/// three decades of the data (a farther `B*` is named in the legend only).
fn fit_marks(s: &StepsSeries) -> Vec<f64> {
    let Some(f) = s.fit else { return vec![] };
    let max_b = s.points.iter().map(|p| p.0).fold(f64::NAN, f64::max);
    let mut v = vec![f.b0];
    if max_b.is_nan() || f.b_star <= 1e3 * max_b {
        v.push(f.b_star);
    }
    v
}

impl StepsFigure<'_> {
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        title: &str,
        series: &[(usize, &StepsSeries)],
    ) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let xs = span(
            series
                .iter()
                .flat_map(|(_, s)| s.points.iter().map(|p| p.0).chain(fit_marks(s))),
            true,
        );
        let ys = span(
            series
                .iter()
                .flat_map(|(_, s)| s.points.iter().map(|p| p.1)),
            true,
        );
        let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
            return empty(area, title);
        };
        let x = Axis {
            lo: x0,
            hi: x1,
            log: true,
        };
        // Room below the data for the fitted floor and the linear-scaling line.
        let y = Axis {
            lo: y0 / 1.5,
            hi: y1 * 1.5,
            log: true,
        };
        let single = series.len() == 1;
        with_chart!(
            area,
            title,
            x,
            y,
            "batch size",
            "steps to target",
            |chart| {
                for &(i, s) in series {
                    let c = color(i);
                    let pts = inside(&s.points, x, y);
                    let data_label = if single {
                        "data".to_string()
                    } else {
                        s.label.clone()
                    };
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))?
                        .label(data_label)
                        .legend(move |(px, py)| Circle::new((px + 10, py), 5, c.filled()));
                    let Some(f) = s.fit else { continue };
                    let curve: Vec<(f64, f64)> = samples(x.lo, x.hi, 200, true)
                        .map(|b| (b, f.steps(b)))
                        .collect();
                    for (k, run) in clip(&curve, x, y).into_iter().enumerate() {
                        let sr = chart.draw_series(LineSeries::new(run, c.stroke_width(2)))?;
                        if k == 0 && single {
                            sr.label(format!("fit a + b/B (a={}, b={})", tick(f.a), tick(f.b)))
                                .legend(move |(px, py)| {
                                    PathElement::new(
                                        vec![(px, py), (px + 20, py)],
                                        c.stroke_width(2),
                                    )
                                });
                        }
                    }
                    let linear: Vec<(f64, f64)> = samples(x.lo, x.hi, 2, true)
                        .map(|b| (b, f.linear_steps(b)))
                        .collect();
                    for (k, run) in clip(&linear, x, y).into_iter().enumerate() {
                        let sr = chart.draw_series(DashedLineSeries::new(
                            run,
                            8,
                            6,
                            c.stroke_width(1),
                        ))?;
                        if k == 0 && single {
                            sr.label(format!("linear scaling from B0 = {}", tick(f.b0)))
                                .legend(move |(px, py)| {
                                    PathElement::new(
                                        vec![(px, py), (px + 20, py)],
                                        c.stroke_width(1),
                                    )
                                });
                        }
                    }
                    let star_label = if single {
                        format!("B* = {}", tick(f.b_star))
                    } else {
                        format!("{}: B* = {}", s.label, tick(f.b_star))
                    };
                    let star = (f.b_star, f.steps(f.b_star));
                    if x.valid(star.0) && star.0 >= x.lo && star.0 <= x.hi {
                        let vertical = clip(&[(star.0, y.lo), (star.0, y.hi)], x, y);
                        for run in vertical {
                            chart.draw_series(DashedLineSeries::new(
                                run,
                                3,
                                4,
                                c.mix(0.8).stroke_width(1),
                            ))?;
                        }
                        chart
                            .draw_series(
                                inside(&[star], x, y)
                                    .into_iter()
                                    .map(|p| TriangleMarker::new(p, 9, c.filled())),
                            )?
                            .label(star_label)
                            .legend(move |(px, py)| {
                                TriangleMarker::new((px + 10, py), 7, c.filled())
                            });
                    } else {
                        // Off the chart: named in the legend only.
                        chart
                            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
                            .label(format!("{star_label} (off the chart)"))
                            .legend(move |(px, py)| {
                                TriangleMarker::new((px + 10, py), 7, c.filled())
                            });
                    }
                }
                // Steps fall with the batch size: the lower left stays empty.
                legend!(chart, SeriesLabelPosition::LowerLeft);
            }
        );
        Ok(())
    }

    fn grid(&self) -> (usize, usize) {
        let n = self.data.series.len().max(1);
        let cols = (n as f64).sqrt().ceil() as usize;
        (n.div_ceil(cols), cols)
    }
}

impl Figure for StepsFigure<'_> {
    fn size(&self) -> (u32, u32) {
        match self.data.layout {
            Layout::Overlaid => (1000, 700),
            Layout::Panels => {
                let (rows, cols) = self.grid();
                (760 * cols as u32, 560 * rows as u32 + 50)
            }
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let d = self.data;
        let all: Vec<(usize, &StepsSeries)> = d.series.iter().enumerate().collect();
        match d.layout {
            Layout::Overlaid => self.panel(root, &d.title, &all),
            Layout::Panels => {
                let body = root.titled(&d.title, CAPTION)?;
                let (rows, cols) = self.grid();
                let areas = body.split_evenly((rows, cols));
                for (area, one) in areas.iter().zip(&all) {
                    self.panel(area, &one.1.label, std::slice::from_ref(one))?;
                }
                Ok(())
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// (c) final loss vs lr / best lr

/// A series aligned at its optimum: label, best lr, `(lr / best lr, loss)` points and
/// `(lr / best lr, low, high)` bars.
type Aligned<'a> = (&'a str, f64, Vec<(f64, f64)>, Vec<(f64, f64, f64)>);

struct LrFigure<'a> {
    data: &'a LrSensitivityPlot,
}

impl Figure for LrFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let d = self.data;
        // Each series relative to its own best lr.
        let series: Vec<Aligned> = d
            .series
            .iter()
            .filter_map(|s| {
                let mut pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|&(lr, l)| lr.is_finite() && lr > 0.0 && l.is_finite())
                    .collect();
                let best = pts.iter().min_by(|a, b| a.1.total_cmp(&b.1))?.0;
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let bars = s
                    .bars
                    .iter()
                    .filter(|&&(lr, lo, hi)| {
                        lo.is_finite() && hi.is_finite() && pts.iter().any(|p| p.0 == lr)
                    })
                    .map(|&(lr, lo, hi)| (lr / best, lo, hi))
                    .collect();
                let rel = pts.into_iter().map(|(lr, l)| (lr / best, l)).collect();
                Some((s.label.as_str(), best, rel, bars))
            })
            .collect();
        let all = || series.iter().flat_map(|s| s.2.iter());
        let xs = span(all().map(|p| p.0), true);
        let ys = span(
            all()
                .map(|p| p.1)
                .chain(
                    series
                        .iter()
                        .flat_map(|s| s.3.iter().flat_map(|b| [b.1, b.2])),
                )
                .filter(|&l| d.max_loss.is_none_or(|m| l <= m))
                .chain(d.max_loss),
            false,
        );
        let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
            return empty(root, &d.title);
        };
        let x = Axis {
            lo: x0,
            hi: x1,
            log: true,
        };
        let y = Axis {
            lo: y0,
            hi: d.max_loss.unwrap_or(y1),
            log: false,
        };
        with_chart!(
            root,
            &d.title,
            x,
            y,
            "learning rate / best learning rate",
            "final loss",
            |chart| {
                for (i, (label, best, pts, bars)) in series.iter().enumerate() {
                    let c = color(i);
                    for run in clip(pts, x, y) {
                        chart.draw_series(LineSeries::new(run, c.stroke_width(2)))?;
                    }
                    for &(bx, lo, hi) in bars {
                        for run in clip(&[(bx, lo), (bx, hi)], x, y) {
                            chart.draw_series(LineSeries::new(run, c.stroke_width(1)))?;
                        }
                    }
                    chart
                        .draw_series(
                            inside(pts, x, y)
                                .into_iter()
                                .map(|p| Circle::new(p, 4, c.filled())),
                        )?
                        .label(format!("{label} (best lr {})", tick(*best)))
                        .legend(move |(px, py)| {
                            PathElement::new(vec![(px, py), (px + 20, py)], c.stroke_width(2))
                        });
                }
                let v = clip(&[(1.0, y.lo), (1.0, y.hi)], x, y);
                for run in v {
                    chart.draw_series(DashedLineSeries::new(
                        run,
                        3,
                        4,
                        BLACK.mix(0.5).stroke_width(1),
                    ))?;
                }
                // Loss is U-shaped in the lr: the lower corners stay empty.
                legend!(chart, SeriesLabelPosition::LowerRight);
            }
        );
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// (d) B* vs model / data size

struct ScalingFigure<'a> {
    data: &'a BStarScalingPlot,
}

impl Figure for ScalingFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let d = self.data;
        let xs = span(d.points.iter().map(|p| p.x), true);
        let ys = span(d.points.iter().map(|p| p.b_star), true);
        let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
            return empty(root, &d.title);
        };
        let x = Axis {
            lo: x0,
            hi: x1,
            log: true,
        };
        let y = Axis {
            lo: y0,
            hi: y1,
            log: true,
        };
        with_chart!(
            root,
            &d.title,
            x,
            y,
            d.x_label.as_str(),
            "critical batch size B*",
            |chart| {
                let c = color(0);
                if let Some(law) = d.fit {
                    let line: Vec<(f64, f64)> = samples(x.lo, x.hi, 2, true)
                        .map(|v| (v, law.eval(v)))
                        .collect();
                    for (k, run) in clip(&line, x, y).into_iter().enumerate() {
                        let sr = chart.draw_series(LineSeries::new(run, c.stroke_width(2)))?;
                        if k == 0 {
                            sr.label(format!("B* = {} x^{:.3}", tick(law.coef), law.exponent))
                                .legend(move |(px, py)| {
                                    PathElement::new(
                                        vec![(px, py), (px + 20, py)],
                                        c.stroke_width(2),
                                    )
                                });
                        }
                    }
                }
                for (i, p) in d.points.iter().enumerate() {
                    let pc = color(i + 1);
                    chart
                        .draw_series(
                            inside(&[(p.x, p.b_star)], x, y)
                                .into_iter()
                                .map(|q| Circle::new(q, 6, pc.filled())),
                        )?
                        .label(format!("{} (B* = {})", p.label, tick(p.b_star)))
                        .legend(move |(px, py)| Circle::new((px + 10, py), 5, pc.filled()));
                }
                legend!(chart, SeriesLabelPosition::UpperLeft);
            }
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        assert_eq!(tick(256.0), "256");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(161.4912), "161.5");
        assert_eq!(tick(928.919), "928.9");
        assert_eq!(tick(1.0e6), "1e6");
        assert_eq!(tick(3.9e5), "390000");
        assert_eq!(tick(2.5e-4), "2.5e-4");
        assert_eq!(tick(0.0), "0");
        assert_eq!(log_ticks(30.0, 1100.0), [50.0, 100.0, 200.0, 500.0, 1000.0]);
        let narrow = log_ticks(105.0, 195.0);
        assert!(narrow.len() >= 3 && narrow.len() <= 10, "{narrow:?}");
        assert_eq!(log_ticks(110.0, 450.0), [200.0, 300.0, 400.0]);
        assert_eq!(
            log_ticks(1.0, 1e9),
            [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9]
        );
    }

    #[test]
    fn clipping_keeps_the_visible_part() {
        let ax = Axis {
            lo: 0.0,
            hi: 1.0,
            log: false,
        };
        let runs = clip(&[(-1.0, 0.5), (0.5, 0.5), (2.0, 0.5)], ax, ax);
        assert_eq!(runs, vec![vec![(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]]);
        // Leaving and re-entering gives two runs.
        let runs = clip(&[(0.1, 0.5), (0.5, 2.0), (0.9, 0.5)], ax, ax);
        assert_eq!(runs.len(), 2);
        // Entirely outside, or not placeable: nothing.
        assert!(clip(&[(2.0, 2.0), (3.0, 3.0)], ax, ax).is_empty());
        let lg = Axis {
            lo: 1.0,
            hi: 100.0,
            log: true,
        };
        assert!(clip(&[(-1.0, 10.0), (0.0, 10.0)], lg, lg).is_empty());
        let runs = clip(&[(0.1, 10.0), (1000.0, 10.0)], lg, lg);
        assert_eq!(runs.len(), 1);
        assert!((runs[0][0].0 - 1.0).abs() < 1e-12 && (runs[0][1].0 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_format_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = plot_lr_sensitivity(&LrSensitivityPlot::default(), &dir.path().join("x.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(".png or .svg"), "{err}");
    }
}
