//! Text on bitmap plots, placed by the font's own metrics.
//!
//! plotters 0.3.7 rasterizes text through ab_glyph but puts every glyph's outline at the pen
//! position, dropping the glyph's left side bearing (the offset of its ink from the pen) and
//! truncating the pen to whole pixels. Glyphs with a wide bearing (`1`, `.`) then sit too far
//! left while their neighbours do not, so numbers print with holes: "B = 1 6", "0.0 1",
//! "8.4 87"; and its rounding sets the period a row above the digits' baseline ("3·5").
//! [`MetricText`] wraps a backend and draws the bundled font's text itself: each glyph
//! at its pen position plus its bearing, with the sub-pixel offset kept, advanced by its
//! advance width and kerning. Everything else, and text in any other font, goes to the wrapped
//! backend unchanged. SVG output is not affected (it writes `<text>` and lets the viewer lay it
//! out), so only the bitmap backend is wrapped.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, GlyphId, ScaleFont};
use plotters::prelude::DrawingBackend;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

use super::{DEJAVU_SANS, FONT_FAMILY};

/// The bundled font, parsed once.
fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(DEJAVU_SANS).expect("bundled font parses"))
}

/// Rasterizes `text` in the bundled font at `size` pixels, calling `put(x, y, coverage)` for
/// every touched pixel. The pen starts at x = 0 and the baseline lies `size / 2` (rounded) below
/// the top of plotters' layout box, where plotters puts it, so text stays where plotters' layout,
/// computed from the same advances, expects it.
pub(crate) fn rasterize(size: f64, text: &str, mut put: impl FnMut(i32, i32, f32)) {
    let scale = size as f32;
    let font = font().as_scaled(scale);
    let baseline = (scale / 2.0).round() as i32;
    let mut pen = 0f32;
    let mut prev: Option<GlyphId> = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = prev {
            pen += font.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(pen, 0.0));
        if let Some(outline) = font.outline_glyph(glyph) {
            // The outline's pixel box starts at pen + bearing: the offset plotters drops. Its
            // top is a whole number of pixels above the baseline, and the baseline is one row
            // for all glyphs (plotters truncates `size / 2 + top` toward zero, which puts
            // glyphs that reach far above the baseline a row lower than the rest: "3·5").
            let bounds = outline.px_bounds();
            let (x0, y0) = (bounds.min.x as i32, baseline + bounds.min.y as i32);
            outline.draw(|x, y, coverage| put(x0 + x as i32, y0 + y as i32, coverage));
        }
        pen += font.h_advance(id);
    }
}

/// A drawing backend that draws the bundled font's text by its metrics (see the module docs)
/// and passes everything else to the backend it wraps.
pub(crate) struct MetricText<B>(pub B);

impl<B: DrawingBackend> DrawingBackend for MetricText<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        self.0.estimate_text_size(text, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        (iw, ih): (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.blit_bitmap(pos, (iw, ih), src)
    }

    /// plotters' own `draw_text` (anchor, rotation, clipping to the canvas) with the glyphs
    /// from [`rasterize`].
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        if style.family().as_str() != FONT_FAMILY {
            return self.0.draw_text(text, style, pos);
        }
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let (w, h) = self.get_size();
        let mut result = Ok(());
        rasterize(style.size(), text, |x, y, coverage| {
            if result.is_err() {
                return;
            }
            let (x, y) = transform.transform(x + dx - min_x, y + dy - min_y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                let mixed = BackendColor {
                    alpha: color.alpha * f64::from(coverage),
                    rgb: color.rgb,
                };
                result = self.0.draw_pixel((x, y), mixed);
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use plotters::prelude::*;

    use super::*;

    /// Left margin of the rendered text in [`ink_runs`].
    const MARGIN: i32 = 20;

    /// Renders `text` at `size` pixels in black on white through [`MetricText`] over a bitmap,
    /// as the plots do, and returns per inked column range `[start, end)`, left to right, the
    /// range and its lowest inked row.
    fn ink_runs(text: &str, size: u32) -> Vec<(i32, i32, u32)> {
        super::super::register_font().unwrap();
        let (w, h) = (2 * MARGIN as u32 + size * text.len() as u32, 3 * size);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let style = TextStyle::from((FONT_FAMILY, size).into_font()).color(&BLACK);
            let root = MetricText(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
            root.draw_text(text, &style, (MARGIN, size as i32)).unwrap();
            root.present().unwrap();
        }
        let ink = |x: u32, y: u32| buf[((y * w + x) * 3) as usize] < 200;
        let inked = |x: u32| (0..h).any(|y| ink(x, y));
        let bottom = |xs: std::ops::Range<u32>| {
            xs.flat_map(|x| (0..h).filter(move |&y| ink(x, y)))
                .max()
                .unwrap()
        };
        let mut runs = Vec::new();
        let mut start = None;
        for x in 0..w {
            match (inked(x), start) {
                (true, None) => start = Some(x),
                (false, Some(s)) => {
                    runs.push((s as i32, x as i32, bottom(s..x)));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    /// Where the font's metrics put the ink of each inked glyph of `text`: the pen (advance
    /// widths plus kerning so far) plus the glyph's left side bearing, in pixels.
    fn metric_starts(text: &str, size: u32) -> Vec<f32> {
        let font = font().as_scaled(size as f32);
        let mut pen = 0f32;
        let mut prev = None;
        let mut starts = Vec::new();
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            prev = Some(id);
            if !c.is_whitespace() {
                starts.push(MARGIN as f32 + pen + font.h_side_bearing(id));
            }
            pen += font.h_advance(id);
        }
        starts
    }

    /// The labels that printed as "8.4 87", "0.0 1" and "B = 1 6": every glyph's ink stands
    /// apart from its neighbours, left to right, starts within a pixel of where the advances and
    /// bearings put it, and no gap between two neighbours is as wide as a digit.
    #[test]
    fn digits_advance_by_the_font_metrics() {
        // The legend, label and caption sizes, and one large enough to show any drift.
        for size in [15, 18, 26, 40] {
            let digit = font()
                .as_scaled(size as f32)
                .h_advance(font().glyph_id('0'));
            for text in ["0123456789", "8.487", "0.01", "16", "2.385", "B = 16"] {
                let runs = ink_runs(text, size);
                let want = metric_starts(text, size);
                assert_eq!(
                    runs.len(),
                    want.len(),
                    "{text:?} at {size}px: glyphs merged or split: {runs:?}"
                );
                for (k, (&(start, _, _), &w)) in runs.iter().zip(&want).enumerate() {
                    assert!(
                        (start as f32 - w).abs() <= 1.5,
                        "{text:?} at {size}px: glyph {k} starts at {start}, metrics say {w:.1}"
                    );
                }
                for pair in runs.windows(2) {
                    let ((_, end, _), (next, _, _)) = (pair[0], pair[1]);
                    assert!(end <= next, "{text:?} at {size}px: overlap {runs:?}");
                    let gap = (next - end) as f32;
                    let space = text.contains(' ');
                    assert!(
                        space || gap < digit,
                        "{text:?} at {size}px: a gap of {gap} px, wider than a digit ({digit:.1})"
                    );
                }
            }
        }
    }

    /// Digits and the decimal point stand on one baseline ("3.5", not "3·5"): glyphs whose
    /// outline ends flat on the baseline end on the same pixel row.
    #[test]
    fn the_decimal_point_sits_on_the_baseline() {
        for size in [15, 18, 26, 40] {
            for text in ["1.1", "11.11", "4.7"] {
                let runs = ink_runs(text, size);
                let rows: Vec<u32> = runs.iter().map(|r| r.2).collect();
                assert!(
                    rows.iter().all(|&r| r == rows[0]),
                    "{text:?} at {size}px: bottom rows {rows:?}"
                );
            }
        }
    }
}
