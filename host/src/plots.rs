//! Figures of analyzer reports, each written as `{stem}.svg`, `{stem}.png` and `{stem}.csv` (the numbers the
//! figure shows, in long format).
//!
//! - [`layer_profile`]: the kind of Fig. 1 of Inheritune (arXiv 2404.08634): one panel per metric against the
//!   layer index, ±1 s.d. band, layers the report flags marked, the cut as a dashed line (or, for several
//!   methods, a row of markers per method under the curves).
//! - [`head_heatmap`]: a metric's `per_head` values, layers × heads, viridis colour map with a colour bar.
//! - [`attention_maps`]: attention matrices as images (the kind of the paper's Fig. 2), a grid of panels.
//!
//! Text in the PNG is drawn with DejaVu Sans compiled into the binary (`assets/DejaVuSans.ttf`, licence next
//! to it), so no system font or fontconfig is needed; the PNG is drawn at 3× and averaged down (antialiased).
//! The SVG names the generic `sans-serif` family and is laid out with the same font metrics.
//!
//! Everything is validated and rendered in memory first; the files are then written to temporary names and
//! renamed, so a failure leaves no half-written figure behind.

use anyhow::{anyhow, bail, ensure, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, DrawingErrorKind};
use scalpel_sdk::{Metric, Report};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The font family every text style uses; registered from [`FONT`] on first use.
const FAMILY: &str = "sans-serif";
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

// Font sizes in plotters' convention (the em is size / 1.24), at 1× scale.
const TITLE_PX: f64 = 27.0;
const CAPTION_PX: f64 = 20.0;
const DESC_PX: f64 = 18.0;
const TICK_PX: f64 = 16.0;
const LEGEND_PX: f64 = 16.0;
/// Height of the band that holds a figure's title.
const TITLE_BAND: u32 = 54;
/// The PNG is drawn at this many times its size and then averaged down: antialiased lines, edges and text.
const SUPERSAMPLE: u32 = 3;

/// Matplotlib's tab10: distinct, print-friendly line colours.
const PALETTE: [RGBColor; 10] = [
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
const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
const FLAG_SHADE: RGBColor = RGBColor(0xdc, 0xdc, 0xdc);
const AXIS: RGBColor = RGBColor(0x30, 0x30, 0x30);

// ---------------------------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------------------------

/// Input layers a method removes, marked on every panel of a layer profile.
#[derive(Debug, Clone)]
pub struct Removal {
    pub label: String,
    pub layers: Vec<usize>,
}

/// The paper's Fig. 1 kind: one panel per metric against the layer index, one line per report, the per-layer
/// spread as a ±1 s.d. band, the layers a report flags (its presentation's `mark`) shaded when there is one
/// report, ringed otherwise. One removal that drops a suffix of the layers is a dashed cut line; several are
/// rows of markers under the curves, one per method.
///
/// A report's legend label is `extra.label`, else `extra.model`, else its analyzer name, else `report i`.
/// Writes `{stem}.svg`, `{stem}.png`, `{stem}.csv` (`report,metric,layer,value,spread,flagged`) into `out_dir`.
pub fn layer_profile(
    reports: &[Report],
    metrics: &[&str],
    removals: &[Removal],
    title: &str,
    out_dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    let fig = ProfileFigure::new(reports, metrics, removals, title).context("layer profile")?;
    let csv = fig.csv();
    emit(&fig, csv, out_dir, stem).context("layer profile")
}

/// Heatmap of a metric's `per_head` values: layers on the x axis, heads on the y axis (head 0 at the bottom),
/// viridis colour map with a colour bar; the values are printed in the cells when they fit.
/// Writes `{stem}.svg`, `{stem}.png`, `{stem}.csv` (`layer,head,value,spread`) into `out_dir`.
pub fn head_heatmap(report: &Report, metric: &str, title: &str, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let fig = HeatmapFigure::new(report, metric, title).context("head heatmap")?;
    let csv = fig.csv();
    emit(&fig, csv, out_dir, stem).context("head heatmap")
}

/// The paper's Fig. 2 kind: attention matrices as images, a grid of panels titled by the caller (e.g.
/// "layer 20 head 3"), each from `[T, T]` f32 values in row-major order (row = query, column = key; query 0 at
/// the top). All panels share one linear colour scale, shown by a colour bar. A map longer than 160 tokens is
/// drawn as the maxima of k×k blocks (said in its panel title); the CSV always has every value.
/// Writes `{stem}.svg`, `{stem}.png`, `{stem}.csv` (`panel,query,key,value`) into `out_dir`.
pub fn attention_maps(
    maps: &[(String, usize, Vec<f32>)],
    title: &str,
    out_dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    let fig = MapsFigure::new(maps, title).context("attention maps")?;
    let csv = fig.csv();
    emit(&fig, csv, out_dir, stem).context("attention maps")
}

/// One line of a loss figure: `(step, loss)` points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Loss against training step: one line per curve (training, validation, each round of a run) and a
/// dashed horizontal line per reference value (e.g. the full model's validation loss).
/// Writes `{stem}.svg`, `{stem}.png`, `{stem}.csv` (`curve,step,loss`) into `out_dir`.
pub fn loss_curves(curves: &[Curve], references: &[(String, f64)], title: &str, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let fig = LossFigure::new(curves, references, title).context("loss curve")?;
    let csv = fig.csv();
    emit(&fig, csv, out_dir, stem).context("loss curve")
}

// ---------------------------------------------------------------------------------------------------------------
// Rendering and output
// ---------------------------------------------------------------------------------------------------------------

/// A figure that can be drawn on any plotters backend.
trait Figure {
    /// Size in pixels (the PNG's size; the SVG's in user units).
    fn size(&self) -> (u32, u32);
    /// Draws on `root`, which is `z` times [`Figure::size`]: every length in pixels is scaled by `z`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, z: Z) -> Result<()>;
}

/// The scale a figure is drawn at (1 for SVG, [`SUPERSAMPLE`] for the PNG).
#[derive(Clone, Copy)]
struct Z(f64);

impl Z {
    /// A length in pixels, scaled.
    fn i(self, v: i32) -> i32 {
        (v as f64 * self.0).round() as i32
    }
    fn u(self, v: u32) -> u32 {
        (v as f64 * self.0).round() as u32
    }
    /// A text style of `px` (at 1×), scaled.
    fn font(self, px: f64) -> TextStyle<'static> {
        TextStyle::from((FAMILY, px * self.0).into_font()).color(&AXIS)
    }
}

/// Turns a plotters error (whose type depends on the backend) into an `anyhow` one.
fn de<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the bundled font assets/DejaVuSans.ttf could not be loaded");
    Ok(())
}

fn render(fig: &impl Figure) -> Result<(Vec<u8>, Vec<u8>)> {
    ensure_font()?;
    let (w, h) = fig.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        fig.draw(&root, Z(1.0))?;
        root.present().map_err(de)?;
    }
    let k = SUPERSAMPLE;
    let (bw, bh) = (w * k, h * k);
    let mut big = vec![255u8; bw as usize * bh as usize * 3];
    {
        let root = Typeset::new(BitMapBackend::with_buffer(&mut big, (bw, bh)))?.into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        fig.draw(&root, Z(k as f64))?;
        root.present().map_err(de)?;
    }
    Ok((svg.into_bytes(), encode_png(&downsample(&big, w, h, k), w, h)?))
}

/// Averages each `k`×`k` block of an RGB image of `(w·k)`×`(h·k)` pixels.
fn downsample(big: &[u8], w: u32, h: u32, k: u32) -> Vec<u8> {
    let (w, h, k) = (w as usize, h as usize, k as usize);
    let bw = w * k;
    let mut out = vec![0u8; w * h * 3];
    let n = (k * k) as u32;
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0u32; 3];
            for dy in 0..k {
                let row = ((y * k + dy) * bw + x * k) * 3;
                for dx in 0..k {
                    for c in 0..3 {
                        acc[c] += big[row + dx * 3 + c] as u32;
                    }
                }
            }
            for c in 0..3 {
                out[(y * w + x) * 3 + c] = ((acc[c] + n / 2) / n) as u8;
            }
        }
    }
    out
}

/// A bitmap backend whose text is typeset here with ab_glyph: plotters' own ab_glyph drawing ignores each glyph's
/// side bearing and misplaces the baseline, which makes labels look uneven. Glyphs are placed at subpixel pen
/// positions (with kerning) on a common baseline, anchored and sized as the SVG backend does (em = size / 1.24,
/// baseline 0.76 em below a top anchor, 0.5 ex below a centre one), so the PNG matches the SVG. Everything else
/// is passed through.
struct Typeset<B> {
    inner: B,
    font: ab_glyph::FontRef<'static>,
    /// Height of the font's `x`, in ems.
    x_height: f32,
}

impl<B: DrawingBackend> Typeset<B> {
    fn new(inner: B) -> Result<Self> {
        use ab_glyph::Font as _;
        let font = ab_glyph::FontRef::try_from_slice(FONT).map_err(|e| anyhow!("bundled font: {e}"))?;
        let upem = font.units_per_em().unwrap_or(2048.0);
        let x_height = font.outline(font.glyph_id('x')).map_or(0.55, |o| o.bounds.max.y / upem);
        Ok(Typeset { inner, font, x_height })
    }
}

impl<B: DrawingBackend> DrawingBackend for Typeset<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        use ab_glyph::{Font as _, ScaleFont as _};
        let color = style.color();
        if color.alpha == 0.0 || text.is_empty() {
            return Ok(());
        }
        let em = (style.size() / 1.24) as f32;
        let upem = self.font.units_per_em().unwrap_or(2048.0);
        let scale = ab_glyph::PxScale::from(em * self.font.height_unscaled() / upem);
        let sf = self.font.as_scaled(scale);
        let mut glyphs = Vec::with_capacity(text.len());
        let mut pen = 0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = sf.glyph_id(c);
            if let Some(p) = prev {
                pen += sf.kern(p, id);
            }
            glyphs.push((id, pen));
            pen += sf.h_advance(id);
            prev = Some(id);
        }
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -pen / 2.0,
            HPos::Right => -pen,
        };
        let baseline = match style.anchor().v_pos {
            VPos::Top => 0.76 * em,
            VPos::Center => 0.5 * self.x_height * em,
            VPos::Bottom => -0.5 * self.x_height * em,
        };
        let trans = style.transform();
        let (w, h) = self.inner.get_size();
        let mut pixels = Vec::new();
        for (id, x) in glyphs {
            let glyph = id.with_scale_and_position(scale, ab_glyph::point(x + dx, baseline));
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let min = outline.px_bounds().min;
                outline.draw(|gx, gy, cov| {
                    if cov > 0.0 {
                        pixels.push((min.x as i32 + gx as i32, min.y as i32 + gy as i32, cov.min(1.0)));
                    }
                });
            }
        }
        for (lx, ly, cov) in pixels {
            let (tx, ty) = trans.transform(lx, ly);
            let (x, y) = (pos.0 + tx, pos.1 + ty);
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                let alpha = color.alpha * cov as f64;
                self.inner.draw_pixel((x, y), BackendColor { alpha, rgb: color.rgb })?;
            }
        }
        Ok(())
    }
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().context("encoding PNG")?;
    writer.write_image_data(rgb).context("encoding PNG")?;
    writer.finish().context("encoding PNG")?;
    Ok(out)
}

/// Renders `fig` and writes the three files; returns their paths (svg, png, csv).
fn emit(fig: &impl Figure, csv: String, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    ensure!(
        !stem.is_empty() && !stem.contains(['/', '\\']) && stem != "." && stem != "..",
        "invalid file stem `{stem}`: give a plain file name without extension"
    );
    let (svg, png) = render(fig)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut paths = Vec::new();
    for (ext, bytes) in [("svg", svg), ("png", png), ("csv", csv.into_bytes())] {
        let path = out_dir.join(format!("{stem}.{ext}"));
        scalpel_files::write_file(&path, &bytes)?;
        paths.push(path);
    }
    Ok(paths)
}

// ---------------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------------

/// The series legend of every figure: upper right, on a light box.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>, z: Z) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .margin(z.i(10))
        .legend_area_size(z.i(34))
        .label_font(z.font(LEGEND_PX))
        .background_style(WHITE.mix(0.9))
        .border_style(ShapeStyle::from(&RGBColor(0xb0, 0xb0, 0xb0)).stroke_width(z.u(1)))
        .draw()
        .map_err(de)
}

/// Draws `title` centred in a band of `TITLE_BAND` px at the top of `root`; returns the area below it.
fn title_band<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, z: Z) -> Result<DrawingArea<DB, Shift>> {
    let (top, body) = root.split_vertically(z.i(TITLE_BAND as i32));
    let (w, h) = top.dim_in_pixel();
    let style = z.font(TITLE_PX).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    top.draw_text(title, &style, (w as i32 / 2, h as i32 / 2 + z.i(3))).map_err(de)?;
    Ok(body)
}

/// Compact number for ticks and cell labels: 4 significant digits at most, trailing zeros dropped.
fn fmt_num(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        return format!("{v:.2e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 7) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// Shorter form for values printed inside heatmap cells (3 significant digits).
fn fmt_cell(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 5) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Integer ticks `0, step, 2·step, …` below `n`, with a 1-2-5 step giving at most `max_ticks` of them.
fn int_ticks(n: usize, max_ticks: usize) -> Vec<f64> {
    let max_ticks = max_ticks.max(2);
    let mut step = 1usize;
    'outer: for mag in [1usize, 10, 100, 1000, 10_000, 100_000] {
        for m in [1usize, 2, 5] {
            step = m * mag;
            if n.saturating_sub(1) / step < max_ticks {
                break 'outer;
            }
        }
    }
    (0..n).step_by(step).map(|i| i as f64).collect()
}

/// A continuous axis `from..to` (reversed when `from > to`) whose ticks and grid lines are given, not computed:
/// this is how layer, head and token axes get integer ticks only.
struct Axis {
    from: f64,
    to: f64,
    ticks: Vec<f64>,
    light: Vec<f64>,
}

impl Axis {
    /// Cells `0..n` centred on integers, so the axis runs from -0.5 to n - 0.5; ticks at most `max_ticks`.
    fn cells(n: usize, max_ticks: usize) -> Self {
        Axis { from: -0.5, to: n as f64 - 0.5, ticks: int_ticks(n, max_ticks), light: vec![] }
    }
    fn reversed(mut self) -> Self {
        std::mem::swap(&mut self.from, &mut self.to);
        self
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.from) / (self.to - self.from);
        limit.0 + ((limit.1 - limit.0) as f64 * f + 1e-3).floor() as i32
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.ticks.clone()
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.from..self.to
    }
}

/// A quoted CSV field when needed.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Viridis (matplotlib's, 11 stops as in R's viridisLite), linear in between; `t` in [0, 1].
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 11] = [
        (0x44, 0x01, 0x54),
        (0x48, 0x25, 0x76),
        (0x41, 0x44, 0x87),
        (0x35, 0x60, 0x8d),
        (0x2a, 0x78, 0x8e),
        (0x21, 0x90, 0x8c),
        (0x22, 0xa8, 0x84),
        (0x43, 0xbf, 0x71),
        (0x7a, 0xd1, 0x51),
        (0xbb, 0xdf, 0x27),
        (0xfd, 0xe7, 0x25),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// Black or white, whichever reads better on `c`.
fn ink_on(c: RGBColor) -> &'static RGBColor {
    let lum = 0.2126 * c.0 as f64 + 0.7152 * c.1 as f64 + 0.0722 * c.2 as f64;
    if lum > 140.0 {
        &BLACK
    } else {
        &WHITE
    }
}

/// A vertical colour bar for values `lo..hi` in `area`, with ticks on its right and `label` beside them.
fn draw_colorbar<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, lo: f64, hi: f64, label: &str, z: Z) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(z.i(40))
        .margin_bottom(z.i(58))
        .margin_left(z.i(6))
        .margin_right(z.i(4))
        .right_y_label_area_size(z.i(76))
        .build_cartesian_2d(0f64..1f64, lo..hi)
        .map_err(de)?;
    const STEPS: usize = 256;
    chart
        .draw_series((0..STEPS).map(|k| {
            let a = lo + (hi - lo) * k as f64 / STEPS as f64;
            let b = lo + (hi - lo) * (k + 1) as f64 / STEPS as f64;
            Rectangle::new([(0.0, a), (1.0, b)], viridis((k as f64 + 0.5) / STEPS as f64).filled())
        }))
        .map_err(de)?;
    let frame = ShapeStyle::from(&AXIS).stroke_width(z.u(1));
    chart.draw_series(std::iter::once(Rectangle::new([(0.0, lo), (1.0, hi)], frame))).map_err(de)?;
    let fmt = |v: &f64| fmt_num(*v);
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(7)
        .y_label_formatter(&fmt)
        .label_style(z.font(TICK_PX))
        .axis_desc_style(z.font(DESC_PX))
        .axis_style(frame)
        .set_all_tick_mark_size(z.i(5))
        .y_desc(label)
        .draw()
        .map_err(de)?;
    Ok(())
}

/// `lo..hi` padded so that a constant series still gets a visible range.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo > 1e-12 * hi.abs().max(1.0) {
        (lo, hi)
    } else if lo == 0.0 {
        (0.0, 1.0)
    } else {
        (lo - 0.5 * lo.abs(), hi + 0.5 * hi.abs())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Layer profile
// ---------------------------------------------------------------------------------------------------------------

struct ProfileSeries<'a> {
    label: String,
    values: &'a [f64],
    spread: Option<&'a [f64]>,
    /// `[layer]`, when the report flags layers.
    flagged: Option<Vec<bool>>,
}

struct ProfilePanel<'a> {
    metric: &'a str,
    caption: String,
    series: Vec<ProfileSeries<'a>>,
}

struct ProfileFigure<'a> {
    title: String,
    /// The first removed layer, when one removal drops a suffix.
    cut: Option<usize>,
    /// Removals drawn as marker rows (when `cut` does not describe them).
    removals: Vec<Removal>,
    /// What the flagged layers are, for the legend.
    flag_label: String,
    /// Largest layer count over the reports.
    layers: usize,
    panels: Vec<ProfilePanel<'a>>,
}

/// Legend label of a report: `extra.label`, `extra.model`, the analyzer, or `report i`.
fn report_label(r: &Report, i: usize) -> String {
    for key in ["label", "model"] {
        if let Some(s) = r.extra.get(key).and_then(|v| v.as_str()) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    if r.analyzer.is_empty() {
        format!("report {i}")
    } else {
        r.analyzer.clone()
    }
}

/// Checks that `values` are all finite; the error names what and where.
fn check_finite(values: &[f64], what: impl Fn(usize) -> String) -> Result<()> {
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        bail!("{} is {v}: NaN or infinite values are not plotted", what(i));
    }
    Ok(())
}

/// Panel caption: the metric's name, with its `about` when short enough to fit.
fn metric_caption(m: &Metric) -> String {
    let about = m.about.trim();
    if !about.is_empty() && about.chars().count() <= 60 {
        format!("{}: {about}", m.name)
    } else {
        m.name.clone()
    }
}

impl<'a> ProfileFigure<'a> {
    fn new(reports: &'a [Report], metrics: &'a [&'a str], removals: &[Removal], title: &str) -> Result<Self> {
        ensure!(!reports.is_empty(), "no reports to plot");
        ensure!(!metrics.is_empty(), "no metrics chosen to plot");
        let base: Vec<String> = reports.iter().enumerate().map(|(i, r)| report_label(r, i)).collect();
        let labels: Vec<String> = base
            .iter()
            .enumerate()
            .map(|(i, l)| if base.iter().filter(|b| *b == l).count() > 1 { format!("{l} (#{i})") } else { l.clone() })
            .collect();
        let flagged: Vec<Option<Vec<bool>>> = reports.iter().map(Report::marked_layers).collect();
        let flag_label = reports
            .iter()
            .find_map(|r| Some(r.present.as_ref()?.mark.as_ref()?.label.clone()))
            .unwrap_or_else(|| "flagged layer".into());
        let mut panels = Vec::new();
        let mut layers = 0;
        for &name in metrics {
            let mut caption = None;
            let mut series = Vec::new();
            for (i, r) in reports.iter().enumerate() {
                let m = r.get(name)?;
                let rname = &labels[i];
                ensure!(!m.per_layer.is_empty(), "metric `{name}` of report `{rname}` has no per-layer values");
                check_finite(&m.per_layer, |l| format!("metric `{name}` of report `{rname}` at layer {l}"))?;
                if let Some(s) = &m.per_layer_spread {
                    ensure!(
                        s.len() == m.per_layer.len(),
                        "metric `{name}` of report `{rname}`: per_layer_spread has {} values for {} layers",
                        s.len(),
                        m.per_layer.len()
                    );
                    check_finite(s, |l| format!("spread of metric `{name}` of report `{rname}` at layer {l}"))?;
                }
                layers = layers.max(m.per_layer.len());
                caption.get_or_insert_with(|| metric_caption(m));
                series.push(ProfileSeries {
                    label: rname.clone(),
                    values: &m.per_layer,
                    spread: m.per_layer_spread.as_deref(),
                    flagged: flagged[i].clone(),
                });
            }
            panels.push(ProfilePanel { metric: name, caption: caption.unwrap_or_else(|| name.to_string()), series });
        }
        for r in removals {
            if let Some(&l) = r.layers.iter().find(|&&l| l >= layers) {
                bail!("`{}` removes layer {l}, but the reports have only {layers} layers (0..{layers})", r.label);
            }
        }
        // One removal of a suffix reads best as a cut line.
        let cut = match removals {
            [r] if !r.layers.is_empty() && r.layers.iter().copied().eq(r.layers[0]..layers) => Some(r.layers[0]),
            _ => None,
        };
        let removals = if cut.is_some() { vec![] } else { removals.iter().filter(|r| !r.layers.is_empty()).cloned().collect() };
        Ok(ProfileFigure { title: title.to_string(), cut, removals, flag_label, layers, panels })
    }

    fn grid(&self) -> (usize, usize) {
        let n = self.panels.len();
        let cols = n.min(3);
        (n.div_ceil(cols), cols)
    }

    fn csv(&self) -> String {
        let mut out = String::from("report,metric,layer,value,spread,flagged\n");
        for p in &self.panels {
            for s in &p.series {
                for (l, v) in s.values.iter().enumerate() {
                    let spread = s.spread.map(|sp| sp[l].to_string()).unwrap_or_default();
                    let flagged = s.flagged.as_ref().and_then(|z| z.get(l)).map(|b| b.to_string()).unwrap_or_default();
                    let _ = writeln!(out, "{},{},{l},{v},{spread},{flagged}", csv_field(&s.label), csv_field(p.metric));
                }
            }
        }
        out
    }

    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        p: &ProfilePanel,
        legend: bool,
        z: Z,
    ) -> Result<()> {
        let n = self.layers;
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in &p.series {
            for (l, &v) in s.values.iter().enumerate() {
                let d = s.spread.map_or(0.0, |sp| sp[l].abs());
                lo = lo.min(v - d);
                hi = hi.max(v + d);
            }
        }
        if lo >= 0.0 {
            lo = 0.0;
        }
        let (lo, hi) = padded(lo, hi);
        let hi = hi + 0.06 * (hi - lo);
        let lo = if lo < 0.0 { lo - 0.04 * (hi - lo) } else { lo };
        // A band under the curves with one row of markers per removal.
        let row = 0.07 * (hi - lo);
        let lo = lo - row * self.removals.len() as f64;
        let (w, _) = area.dim_in_pixel();
        let max_ticks = ((w as f64 / z.0) as usize / 45).clamp(4, 25);

        let mut chart = ChartBuilder::on(area)
            .caption(&p.caption, z.font(CAPTION_PX))
            .margin(z.i(12))
            .margin_right(z.i(22))
            .x_label_area_size(z.i(50))
            .y_label_area_size(z.i(66))
            .build_cartesian_2d(Axis::cells(n, max_ticks), lo..hi)
            .map_err(de)?;

        let line = |c: RGBColor, w: u32| ShapeStyle::from(&c).stroke_width(z.u(w));
        let (lw, lh) = (z.i(24), z.i(7));
        let single = p.series.len() == 1;
        // Lazy layers of a single report: shaded columns behind everything.
        let mut any_flagged = false;
        if single {
            if let Some(flagged) = &p.series[0].flagged {
                let cols: Vec<usize> = (0..p.series[0].values.len()).filter(|&l| flagged.get(l) == Some(&true)).collect();
                any_flagged = !cols.is_empty();
                let anno =
                    chart
                        .draw_series(cols.iter().map(|&l| {
                            Rectangle::new([(l as f64 - 0.5, lo), (l as f64 + 0.5, hi)], FLAG_SHADE.filled())
                        }))
                        .map_err(de)?;
                if any_flagged {
                    anno.label(self.flag_label.clone())
                        .legend(move |(x, y)| Rectangle::new([(x, y - lh), (x + lw, y + lh)], FLAG_SHADE.filled()));
                }
            }
        }

        let fmt_x = |v: &f64| format!("{}", v.round() as i64);
        let fmt_y = |v: &f64| fmt_num(*v);
        chart
            .configure_mesh()
            .x_desc("layer index")
            .y_desc(p.metric)
            .x_label_formatter(&fmt_x)
            .y_label_formatter(&fmt_y)
            .y_labels(8)
            .label_style(z.font(TICK_PX))
            .axis_desc_style(z.font(DESC_PX))
            .bold_line_style(line(GRID, 1))
            .light_line_style(TRANSPARENT)
            .axis_style(line(AXIS, 1))
            .set_all_tick_mark_size(z.i(5))
            .draw()
            .map_err(de)?;

        // Spread bands, then lines, so that no band hides a line.
        let mut any_band = false;
        for (k, s) in p.series.iter().enumerate() {
            if let Some(sp) = s.spread {
                any_band = true;
                let c = PALETTE[k % PALETTE.len()];
                let upper = s.values.iter().zip(sp).enumerate().map(|(l, (v, d))| (l as f64, v + d.abs()));
                let lower = s.values.iter().zip(sp).enumerate().rev().map(|(l, (v, d))| (l as f64, v - d.abs()));
                let pts: Vec<(f64, f64)> = upper.chain(lower).collect();
                chart.draw_series(std::iter::once(Polygon::new(pts, c.mix(0.2).filled()))).map_err(de)?;
            }
        }
        for (k, s) in p.series.iter().enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s.values.iter().enumerate().map(|(l, &v)| (l as f64, v)).collect();
            chart.draw_series(LineSeries::new(pts.clone(), line(c, 2))).map_err(de)?.label(s.label.clone()).legend(
                move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (lw, 0)], line(c, 2))
                        + Circle::new((lw / 2, 0), z.u(4), c.filled())
                },
            );
            if s.values.len() <= 64 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, z.u(4), c.filled()))).map_err(de)?;
            }
            if !single {
                if let Some(flagged) = &s.flagged {
                    let rings: Vec<(f64, f64)> =
                        pts.iter().enumerate().filter(|(l, _)| flagged.get(*l) == Some(&true)).map(|(_, &p)| p).collect();
                    any_flagged |= !rings.is_empty();
                    chart.draw_series(rings.into_iter().map(|p| Circle::new(p, z.u(8), line(c, 2)))).map_err(de)?;
                }
            }
        }
        if any_band {
            // In the report's colour when there is one report, neutral otherwise.
            let swatch = if single { PALETTE[0].mix(0.3) } else { BLACK.mix(0.2) };
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                .map_err(de)?
                .label("±1 s.d. over sequences")
                .legend(move |(x, y)| Rectangle::new([(x, y - lh), (x + lw, y + lh)], swatch.filled()));
        }
        if !single && any_flagged {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), u32>>())
                .map_err(de)?
                .label(self.flag_label.clone())
                .legend(move |(x, y)| Circle::new((x + lw / 2, y), z.u(8), line(AXIS, 2)));
        }
        for (k, r) in self.removals.iter().enumerate() {
            let c = PALETTE[(p.series.len() + k) % PALETTE.len()];
            let y = lo + row * (k as f64 + 0.5);
            let marks = r.layers.iter().map(move |&l| TriangleMarker::new((l as f64, y), z.u(6), c.filled()));
            chart
                .draw_series(marks)
                .map_err(de)?
                .label(format!("removed by {}", r.label))
                .legend(move |(x, y)| TriangleMarker::new((x + lw / 2, y), z.u(6), c.filled()));
        }
        if let Some(c) = self.cut {
            let x = c as f64 - 0.5;
            chart
                .draw_series(DashedLineSeries::new(vec![(x, lo), (x, hi)], z.i(9), z.i(6), line(BLACK, 2)))
                .map_err(de)?
                .label(format!("cut: layers ≥ {c} removed"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + lw, y)], z.i(6), z.i(4), line(BLACK, 2))
                });
        }
        if legend {
            draw_legend(&mut chart, z)?;
        }
        Ok(())
    }
}

impl Figure for ProfileFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        let w = if cols == 1 { 1000 } else { 620 * cols as u32 };
        (w, 600 + 520 * (rows as u32 - 1))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, z: Z) -> Result<()> {
        let body = title_band(root, &self.title, z)?;
        let (rows, cols) = self.grid();
        let areas = body.split_evenly((rows, cols));
        for (k, (p, a)) in self.panels.iter().zip(&areas).enumerate() {
            self.draw_panel(a, p, k == 0, z)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Head heatmap
// ---------------------------------------------------------------------------------------------------------------

struct HeatmapFigure<'a> {
    title: String,
    metric: &'a Metric,
    values: &'a [Vec<f64>],
    heads: usize,
    lo: f64,
    hi: f64,
}

impl<'a> HeatmapFigure<'a> {
    fn new(report: &'a Report, metric: &str, title: &str) -> Result<Self> {
        let m = report.get(metric)?;
        let rname = if report.analyzer.is_empty() { "(unnamed)" } else { report.analyzer.as_str() };
        let values = m
            .per_head
            .as_deref()
            .ok_or_else(|| anyhow!("metric `{metric}` of report `{rname}` has no per-head values"))?;
        ensure!(!values.is_empty(), "metric `{metric}` of report `{rname}` has per-head values for no layer");
        let heads = values[0].len();
        ensure!(heads > 0, "metric `{metric}` of report `{rname}` has no heads in layer 0");
        for (l, row) in values.iter().enumerate() {
            ensure!(
                row.len() == heads,
                "metric `{metric}` of report `{rname}`: layer {l} has {} heads, layer 0 has {heads}",
                row.len()
            );
            check_finite(row, |h| format!("metric `{metric}` of report `{rname}` at layer {l} head {h}"))?;
        }
        if let Some(sp) = &m.per_head_spread {
            ensure!(
                sp.len() == values.len() && sp.iter().all(|r| r.len() == heads),
                "metric `{metric}` of report `{rname}`: per_head_spread is not [{}][{heads}]",
                values.len()
            );
        }
        let lo = values.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = padded(lo, hi);
        Ok(HeatmapFigure { title: title.to_string(), metric: m, values, heads, lo, hi })
    }

    fn csv(&self) -> String {
        let mut out = String::from("layer,head,value,spread\n");
        for (l, row) in self.values.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                let sp = self.metric.per_head_spread.as_ref().map(|s| s[l][h].to_string()).unwrap_or_default();
                let _ = writeln!(out, "{l},{h},{v},{sp}");
            }
        }
        out
    }
}

impl Figure for HeatmapFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, z: Z) -> Result<()> {
        let body = title_band(root, &self.title, z)?;
        let (w, _) = body.dim_in_pixel();
        let (main, bar) = body.split_horizontally(w as i32 - z.i(140));
        let (layers, heads) = (self.values.len(), self.heads);
        let mut chart = ChartBuilder::on(&main)
            .caption(metric_caption(self.metric), z.font(CAPTION_PX))
            .margin(z.i(12))
            .margin_right(z.i(4))
            .x_label_area_size(z.i(50))
            .y_label_area_size(z.i(62))
            .build_cartesian_2d(Axis::cells(layers, 24), Axis::cells(heads, 16))
            .map_err(de)?;
        let span = self.hi - self.lo;
        let colour = |v: f64| viridis((v - self.lo) / span);
        chart
            .draw_series(self.values.iter().enumerate().flat_map(|(l, row)| {
                row.iter().enumerate().map(move |(h, &v)| {
                    let (x, y) = (l as f64, h as f64);
                    Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], colour(v).filled())
                })
            }))
            .map_err(de)?;
        let fmt_i = |v: &f64| format!("{}", v.round() as i64);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("layer index")
            .y_desc("head index")
            .x_label_formatter(&fmt_i)
            .y_label_formatter(&fmt_i)
            .label_style(z.font(TICK_PX))
            .axis_desc_style(z.font(DESC_PX))
            .axis_style(ShapeStyle::from(&AXIS).stroke_width(z.u(1)))
            .set_all_tick_mark_size(z.i(5))
            .draw()
            .map_err(de)?;
        // Values in the cells when there is room for them.
        let (pw, ph) = chart.plotting_area().dim_in_pixel();
        let (cw, ch) = (pw as f64 / z.0 / layers as f64, ph as f64 / z.0 / heads as f64);
        let cell_px = (ch * 0.5).min(cw * 0.3).min(16.0);
        if cell_px >= 11.0 {
            let style = |c: RGBColor| {
                TextStyle::from((FAMILY, cell_px * z.0).into_font())
                    .color(ink_on(c))
                    .pos(Pos::new(HPos::Center, VPos::Center))
            };
            chart
                .draw_series(self.values.iter().enumerate().flat_map(|(l, row)| {
                    row.iter()
                        .enumerate()
                        .map(move |(h, &v)| Text::new(fmt_cell(v), (l as f64, h as f64), style(colour(v))))
                }))
                .map_err(de)?;
        }
        draw_colorbar(&bar, self.lo, self.hi, &self.metric.name, z)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention maps
// ---------------------------------------------------------------------------------------------------------------

struct MapsFigure<'a> {
    title: String,
    maps: &'a [(String, usize, Vec<f32>)],
    lo: f64,
    hi: f64,
}

const MAP_PANEL_PX: u32 = 330;
const MAP_BAR_PX: u32 = 130;
/// Above this many tokens a map is drawn in blocks (their maxima), which keeps the SVG small.
const MAP_MAX_CELLS: usize = 160;

impl<'a> MapsFigure<'a> {
    fn new(maps: &'a [(String, usize, Vec<f32>)], title: &str) -> Result<Self> {
        ensure!(!maps.is_empty(), "no attention maps to plot");
        let (mut lo, mut hi) = (0f64, f64::NEG_INFINITY);
        for (name, t, data) in maps {
            ensure!(*t > 0, "attention map `{name}` has T = 0");
            ensure!(
                data.len() == t * t,
                "attention map `{name}`: {} values, but T = {t} needs T×T = {}",
                data.len(),
                t * t
            );
            if let Some(k) = data.iter().position(|v| !v.is_finite()) {
                bail!(
                    "attention map `{name}` is {} at query {} key {}: NaN or infinite values are not plotted",
                    data[k],
                    k / t,
                    k % t
                );
            }
            for &v in data {
                lo = lo.min(v as f64);
                hi = hi.max(v as f64);
            }
        }
        let (lo, hi) = padded(lo, hi);
        Ok(MapsFigure { title: title.to_string(), maps, lo, hi })
    }

    fn grid(&self) -> (usize, usize) {
        let n = self.maps.len();
        let cols = if n <= 4 { n } else { ((n as f64 * 1.5).sqrt().ceil() as usize).min(n) };
        (n.div_ceil(cols), cols)
    }

    fn csv(&self) -> String {
        let mut out = String::from("panel,query,key,value\n");
        for (name, t, data) in self.maps {
            let name = csv_field(name);
            for (k, v) in data.iter().enumerate() {
                let _ = writeln!(out, "{name},{},{},{v}", k / t, k % t);
            }
        }
        out
    }

    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        (name, t, data): &(String, usize, Vec<f32>),
        left: bool,
        bottom: bool,
        z: Z,
    ) -> Result<()> {
        let t = *t;
        // Long sequences are drawn as maxima of k×k blocks, which keeps sinks and diagonals visible (the CSV keeps
        // every value).
        let k = t.div_ceil(MAP_MAX_CELLS);
        let title = if k > 1 { format!("{name} (max of {k}×{k})") } else { name.clone() };
        let (head, area) = area.split_vertically(z.i(30));
        // Margins that make the image square.
        let (aw, ah) = area.dim_in_pixel();
        let (xl, yl, m) = (z.i(if bottom { 44 } else { 26 }), z.i(if left { 58 } else { 36 }), z.i(8));
        let (pw, ph) = (aw as i32 - yl - 2 * m, ah as i32 - xl - 2 * m);
        let side = pw.min(ph).max(1);
        let (ex, ey) = (pw - side, ph - side);
        // The panel title, centred over the image.
        let centre = m + ex / 2 + yl + side / 2;
        let style = z.font(CAPTION_PX - 2.0).pos(Pos::new(HPos::Center, VPos::Center));
        head.draw_text(&title, &style, (centre, z.i(17))).map_err(de)?;
        // Query 0 at the top, as in a matrix.
        let mut chart = ChartBuilder::on(&area)
            .margin_top(m)
            .margin_bottom(m + ey)
            .margin_left(m + ex / 2)
            .margin_right(m + ex - ex / 2)
            .x_label_area_size(xl)
            .y_label_area_size(yl)
            .build_cartesian_2d(Axis::cells(t, 5), Axis::cells(t, 5).reversed())
            .map_err(de)?;
        let span = self.hi - self.lo;
        let bg = viridis((0.0 - self.lo) / span);
        let end = t as f64 - 0.5;
        chart.draw_series(std::iter::once(Rectangle::new([(-0.5, -0.5), (end, end)], bg.filled()))).map_err(de)?;
        let n = t.div_ceil(k);
        let block = |bi: usize, bj: usize| -> f64 {
            let (rows, cols) = (bi * k..((bi + 1) * k).min(t), bj * k..((bj + 1) * k).min(t));
            rows.flat_map(|i| cols.clone().map(move |j| data[i * t + j] as f64)).fold(f64::NEG_INFINITY, f64::max)
        };
        // Only cells whose colour differs from the background (keeps the SVG small for sparse maps).
        chart
            .draw_series((0..n * n).filter_map(|c| {
                let (bi, bj) = (c / n, c % n);
                let colour = viridis((block(bi, bj) - self.lo) / span);
                (colour != bg).then(|| {
                    let (i0, j0) = ((bi * k) as f64 - 0.5, (bj * k) as f64 - 0.5);
                    let (i1, j1) = ((((bi + 1) * k).min(t)) as f64 - 0.5, (((bj + 1) * k).min(t)) as f64 - 0.5);
                    Rectangle::new([(j0, i0), (j1, i1)], colour.filled())
                })
            }))
            .map_err(de)?;
        let fmt_i = |v: &f64| format!("{}", v.round() as i64);
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .x_label_formatter(&fmt_i)
            .y_label_formatter(&fmt_i)
            .label_style(z.font(TICK_PX - 2.0))
            .axis_desc_style(z.font(DESC_PX - 2.0))
            .axis_style(ShapeStyle::from(&AXIS).stroke_width(z.u(1)))
            .set_all_tick_mark_size(z.i(4));
        if bottom {
            mesh.x_desc("key position");
        }
        if left {
            mesh.y_desc("query position");
        }
        mesh.draw().map_err(de)?;
        Ok(())
    }
}

impl Figure for MapsFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        (MAP_PANEL_PX * cols as u32 + MAP_BAR_PX, TITLE_BAND + MAP_PANEL_PX * rows as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, z: Z) -> Result<()> {
        let body = title_band(root, &self.title, z)?;
        let (w, _) = body.dim_in_pixel();
        let (grid, bar) = body.split_horizontally(w as i32 - z.i(MAP_BAR_PX as i32));
        let (rows, cols) = self.grid();
        let areas = grid.split_evenly((rows, cols));
        for (k, (m, a)) in self.maps.iter().zip(&areas).enumerate() {
            let (r, c) = (k / cols, k % cols);
            let bottom = r == rows - 1 || k + cols >= self.maps.len();
            self.draw_panel(a, m, c == 0, bottom, z)?;
        }
        draw_colorbar(&bar, self.lo, self.hi, "attention weight", z)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use scalpel_sdk::{LayerMark, Presentation};

    fn cut(first: usize, layers: usize) -> Vec<Removal> {
        vec![Removal { label: "cut".into(), layers: (first..layers).collect() }]
    }

    /// A GPT-2-Medium-like profile: rank peaks early, deep layers collapse to rank 1.
    fn synthetic_report(analyzer: &str, layers: usize, heads: usize, seed: u64) -> Report {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut rnd = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        let peak = layers as f64 / 4.0;
        let mut per_head = vec![vec![0.0; heads]; layers];
        let mut mass_head = vec![vec![0.0; heads]; layers];
        for l in 0..layers {
            let x = l as f64;
            let scale = if x < peak { 4.0 + 29.0 * x / peak } else { 33.0 * (-(x - peak) / 2.5).exp() };
            for h in 0..heads {
                let r: f64 = 1.0 + (scale * rnd()).floor();
                per_head[l][h] = if l >= layers / 2 + 2 { 1.0 } else { r };
                mass_head[l][h] = 1.0 + 0.6 * r * rnd();
            }
        }
        let rank: Vec<f64> = per_head.iter().map(|r| r.iter().copied().fold(0.0, f64::max)).collect();
        let mass: Vec<f64> = mass_head.iter().map(|r| r.iter().sum::<f64>() / heads as f64).collect();
        let spread_r: Vec<f64> = rank.iter().map(|v| if *v <= 1.0 { 0.0 } else { 0.15 * v }).collect();
        let spread_m: Vec<f64> = mass.iter().map(|v| 0.1 * v).collect();
        let flag: Vec<f64> = rank.iter().map(|&v| f64::from(u8::from(v <= 1.0))).collect();
        Report {
            analyzer: analyzer.into(),
            metrics: vec![
                Metric::per_layer("rank", rank)
                    .about("max over heads of rank k* (τ = 0.9)")
                    .spread(spread_r)
                    .heads(per_head, None),
                Metric::per_layer("mass", mass)
                    .about("mean over heads of mass m* (η = 0.9)")
                    .spread(spread_m)
                    .heads(mass_head, None),
                Metric::per_layer("flag", flag),
            ],
            present: Some(Presentation {
                title: "attention".into(),
                profile: vec!["rank".into(), "mass".into()],
                mark: Some(LayerMark { metric: "flag".into(), label: "rank-1 layer".into() }),
                attention_maps_by: None,
            }),
            ..Report::default()
        }
    }

    fn attention(pattern: &str, t: usize) -> Vec<f32> {
        let mut a = vec![0f32; t * t];
        for i in 0..t {
            for j in 0..=i {
                let uniform = 1.0 / (i + 1) as f32;
                a[i * t + j] = match pattern {
                    "sink" => (j == 0) as u8 as f32 * 0.9 + 0.1 * uniform,
                    "uniform" => uniform,
                    "previous" => (j + 1 == i || (i == 0 && j == 0)) as u8 as f32,
                    _ => (j == i) as u8 as f32,
                };
            }
        }
        a
    }

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        // Not blank: some dark pixels (text, axes) are there.
        let dark = buf[..info.buffer_size()].chunks(3).filter(|p| p.iter().all(|&c| c < 80)).count();
        assert!(dark > 500, "{} looks blank ({dark} dark pixels)", path.display());
        (info.width, info.height)
    }

    fn csv_rows(path: &Path) -> usize {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().count() - 1
    }

    fn check_outputs(paths: &[PathBuf], dir: &Path, stem: &str) {
        let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, [format!("{stem}.svg"), format!("{stem}.png"), format!("{stem}.csv")]);
        for p in paths {
            assert!(p.starts_with(dir) && p.is_file(), "{} missing", p.display());
        }
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // No temporary files left behind.
        for e in std::fs::read_dir(dir).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.contains(".tmp-"), "left over: {n}");
        }
    }

    #[test]
    fn plots_layer_profile_files_sizes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let a = synthetic_report("attention_rank", 24, 16, 1);
        let b = synthetic_report("attention_rank", 12, 16, 2);
        let paths =
            layer_profile(&[a.clone(), b], &["rank", "mass"], &cut(12, 24), "GPT-2 Medium", dir.path(), "profile")
                .unwrap();
        check_outputs(&paths, dir.path(), "profile");
        assert_eq!(png_size(&paths[1]), (1240, 600));
        assert_eq!(csv_rows(&paths[2]), 2 * (24 + 12));
        let csv = std::fs::read_to_string(&paths[2]).unwrap();
        assert!(csv.starts_with("report,metric,layer,value,spread,flagged\n"));
        // Same analyzer twice: labels are told apart.
        assert!(csv.contains("attention_rank (#0),rank,0,") && csv.contains("attention_rank (#1),mass,11,"));
        assert!(csv.lines().any(|l| l.starts_with("attention_rank (#0),rank,23,1,0,true")));

        let paths = layer_profile(&[a], &["rank"], &[], "one", dir.path(), "single").unwrap();
        assert_eq!(png_size(&paths[1]), (1000, 600));
        assert_eq!(csv_rows(&paths[2]), 24);
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(svg.contains("layer index") && svg.contains("rank"));
    }

    #[test]
    fn plots_layer_profile_errors() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic_report("attention_rank", 8, 4, 3);
        let err = |res: Result<Vec<PathBuf>>| format!("{:#}", res.unwrap_err());

        let e = err(layer_profile(std::slice::from_ref(&r), &["rank", "entropy"], &[], "t", dir.path(), "x"));
        assert!(e.contains("`entropy`") && e.contains("rank"), "{e}");

        let mut nan = r.clone();
        nan.metrics[1].per_layer[5] = f64::NAN;
        let e = err(layer_profile(&[nan], &["mass"], &[], "t", dir.path(), "x"));
        assert!(e.contains("`mass`") && e.contains("layer 5") && e.contains("NaN"), "{e}");

        let mut nan = r.clone();
        nan.metrics[0].per_layer_spread.as_mut().unwrap()[2] = f64::NAN;
        let e = err(layer_profile(&[nan], &["rank"], &[], "t", dir.path(), "x"));
        assert!(e.contains("spread of metric `rank`") && e.contains("layer 2"), "{e}");

        let mut empty = r.clone();
        empty.metrics[0] = Metric::per_layer("rank", vec![]);
        let e = err(layer_profile(&[empty], &["rank"], &[], "t", dir.path(), "x"));
        assert!(e.contains("`rank`") && e.contains("no per-layer values"), "{e}");

        let e = err(layer_profile(std::slice::from_ref(&r), &["rank"], &cut(9, 10), "t", dir.path(), "x"));
        assert!(e.contains("removes layer 9") && e.contains("only 8 layers"), "{e}");
        assert!(err(layer_profile(&[], &["rank"], &[], "t", dir.path(), "x")).contains("no reports"));
        assert!(err(layer_profile(std::slice::from_ref(&r), &[], &[], "t", dir.path(), "x")).contains("no metrics"));
        assert!(err(layer_profile(&[r], &["rank"], &[], "t", dir.path(), "a/b")).contains("invalid file stem"));
        // Nothing written by any failed call.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn plots_head_heatmap_files_sizes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic_report("attention_rank", 12, 12, 4);
        let paths = head_heatmap(&r, "rank", "rank per head", dir.path(), "heads").unwrap();
        check_outputs(&paths, dir.path(), "heads");
        assert_eq!(png_size(&paths[1]), (1000, 600));
        assert_eq!(csv_rows(&paths[2]), 12 * 12);
        // Constant values (every head rank 1) still render.
        let flat = Report::new().metric(Metric::per_layer("rank", vec![1.0; 3]).heads(vec![vec![1.0; 5]; 3], None));
        let paths = head_heatmap(&flat, "rank", "flat", dir.path(), "flat").unwrap();
        assert_eq!(csv_rows(&paths[2]), 15);
    }

    #[test]
    fn plots_head_heatmap_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = |res: Result<Vec<PathBuf>>| format!("{:#}", res.unwrap_err());
        let r = synthetic_report("attention_rank", 6, 4, 5);
        let e = err(head_heatmap(&r, "entropy", "t", dir.path(), "x"));
        assert!(e.contains("`entropy`"), "{e}");
        let no_heads = Report::new().metric(Metric::per_layer("bi", vec![0.1, 0.2]));
        let e = err(head_heatmap(&no_heads, "bi", "t", dir.path(), "x"));
        assert!(e.contains("`bi`") && e.contains("no per-head values"), "{e}");
        let mut nan = r.clone();
        nan.metrics[0].per_head.as_mut().unwrap()[3][2] = f64::NAN;
        let e = err(head_heatmap(&nan, "rank", "t", dir.path(), "x"));
        assert!(e.contains("`rank`") && e.contains("layer 3 head 2") && e.contains("NaN"), "{e}");
        let mut ragged = r;
        ragged.metrics[0].per_head.as_mut().unwrap()[1].pop();
        let e = err(head_heatmap(&ragged, "rank", "t", dir.path(), "x"));
        assert!(e.contains("layer 1 has 3 heads"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn plots_attention_maps_files_sizes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let t = 20;
        let maps: Vec<(String, usize, Vec<f32>)> = ["sink", "uniform", "previous", "identity", "sink", "uniform"]
            .iter()
            .enumerate()
            .map(|(k, p)| (format!("layer {} head {k}", 2 * k), t, attention(p, t)))
            .collect();
        let paths = attention_maps(&maps, "attention", dir.path(), "maps").unwrap();
        check_outputs(&paths, dir.path(), "maps");
        // 6 panels: 3 columns, 2 rows.
        assert_eq!(png_size(&paths[1]), (3 * MAP_PANEL_PX + MAP_BAR_PX, TITLE_BAND + 2 * MAP_PANEL_PX));
        assert_eq!(csv_rows(&paths[2]), 6 * t * t);
        let paths = attention_maps(&maps[..1], "one", dir.path(), "one").unwrap();
        assert_eq!(png_size(&paths[1]), (MAP_PANEL_PX + MAP_BAR_PX, TITLE_BAND + MAP_PANEL_PX));
        // A long sequence is drawn in blocks, but its CSV keeps every value; panels may differ in T.
        let long = vec![maps[0].clone(), ("layer 9 head 9".to_string(), 170, attention("sink", 170))];
        let paths = attention_maps(&long, "long", dir.path(), "long").unwrap();
        assert_eq!(csv_rows(&paths[2]), t * t + 170 * 170);
        assert!(std::fs::read_to_string(&paths[0]).unwrap().contains("layer 9 head 9 (max of 2×2)"));
    }

    #[test]
    fn plots_attention_maps_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = |res: Result<Vec<PathBuf>>| format!("{:#}", res.unwrap_err());
        assert!(err(attention_maps(&[], "t", dir.path(), "x")).contains("no attention maps"));
        let e = err(attention_maps(&[("layer 1 head 0".into(), 4, vec![0.0; 15])], "t", dir.path(), "x"));
        assert!(e.contains("`layer 1 head 0`") && e.contains("15 values"), "{e}");
        let mut a = attention("uniform", 4);
        a[2 * 4 + 1] = f32::NAN;
        let e = err(attention_maps(&[("layer 3 head 1".into(), 4, a)], "t", dir.path(), "x"));
        assert!(e.contains("`layer 3 head 1`") && e.contains("query 2 key 1") && e.contains("NaN"), "{e}");
        let e = err(attention_maps(&[("p".into(), 0, vec![])], "t", dir.path(), "x"));
        assert!(e.contains("T = 0"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn plots_helpers() {
        assert_eq!(int_ticks(24, 12), (0..24).step_by(2).map(|i| i as f64).collect::<Vec<_>>());
        assert_eq!(int_ticks(5, 12), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(int_ticks(100, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0]);
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(24.0), "24");
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_cell(12.345), "12.3");
        assert_eq!(viridis(0.0), RGBColor(0x44, 0x01, 0x54));
        assert_eq!(viridis(1.0), RGBColor(0xfd, 0xe7, 0x25));
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    /// Writes sample figures to `$SCALPEL_PLOTS_PREVIEW` (default /tmp/plots-preview) for a look by eye:
    /// `cargo test --release -p scalpel plots_preview -- --ignored`.
    #[test]
    #[ignore = "writes preview figures for a person to look at"]
    fn plots_preview() {
        let dir = PathBuf::from(std::env::var_os("SCALPEL_PLOTS_PREVIEW").unwrap_or_else(|| "/tmp/plots-preview".into()));
        let mut a = synthetic_report("attention_rank", 24, 16, 7);
        a.extra = serde_json::json!({ "label": "GPT-2 Medium (24 layers)" });
        let mut b = synthetic_report("attention_rank", 12, 16, 8);
        b.extra = serde_json::json!({ "label": "Inheritune (12 layers)" });
        layer_profile(
            &[a.clone()],
            &["rank", "mass"],
            &cut(12, 24),
            "GPT-2 Medium: attention rank and mass per layer",
            &dir,
            "profile",
        )
        .unwrap();
        layer_profile(
            &[a.clone(), b],
            &["rank", "mass"],
            &cut(12, 24),
            "reference vs. inherited",
            &dir,
            "profile-two",
        )
        .unwrap();
        layer_profile(&[a.clone()], &["rank"], &[], "rank only", &dir, "profile-one").unwrap();
        head_heatmap(&a, "rank", "GPT-2 Medium: rank k* per head", &dir, "heatmap").unwrap();
        let small = synthetic_report("attention_rank", 12, 12, 9);
        head_heatmap(&small, "mass", "GPT-2 small: mass m* per head", &dir, "heatmap-small").unwrap();
        let t = 64;
        let maps: Vec<(String, usize, Vec<f32>)> =
            [("identity", 0, 3), ("previous", 2, 7), ("uniform", 5, 1), ("sink", 20, 4)]
                .iter()
                .map(|(p, l, h)| (format!("layer {l} head {h}"), t, attention(p, t)))
                .collect();
        attention_maps(&maps, "Attention maps (T = 64)", &dir, "maps").unwrap();
        let maps100: Vec<(String, usize, Vec<f32>)> = [("uniform", 3, 0), ("sink", 18, 5), ("previous", 1, 2)]
            .iter()
            .map(|(p, l, h)| (format!("layer {l} head {h}"), 100, attention(p, 100)))
            .collect();
        attention_maps(&maps100, "Attention maps (T = 100)", &dir, "maps-100").unwrap();
        let long = vec![("layer 30 head 0".to_string(), 512, attention("sink", 512))];
        attention_maps(&long, "A long window (T = 512)", &dir, "maps-long").unwrap();
        let many: Vec<_> = maps.iter().cycle().take(6).cloned().collect();
        attention_maps(&many, "Attention maps, six panels", &dir, "maps-six").unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Loss curves
// ---------------------------------------------------------------------------------------------------------------

struct LossFigure<'a> {
    title: String,
    curves: &'a [Curve],
    references: &'a [(String, f64)],
    x: (f64, f64),
    y: (f64, f64),
}

impl<'a> LossFigure<'a> {
    fn new(curves: &'a [Curve], references: &'a [(String, f64)], title: &str) -> Result<Self> {
        ensure!(curves.iter().any(|c| !c.points.is_empty()), "no loss values to plot");
        let (mut x, mut y) = ((f64::INFINITY, f64::NEG_INFINITY), (f64::INFINITY, f64::NEG_INFINITY));
        for c in curves {
            check_finite(&c.points.iter().map(|p| p.1).collect::<Vec<_>>(), |i| format!("loss `{}` at point {i}", c.label))?;
            for &(s, l) in &c.points {
                x = (x.0.min(s), x.1.max(s));
                y = (y.0.min(l), y.1.max(l));
            }
        }
        for (name, v) in references {
            ensure!(v.is_finite(), "reference `{name}` is not a finite number");
            y = (y.0.min(*v), y.1.max(*v));
        }
        if x.1 <= x.0 {
            x.1 = x.0 + 1.0;
        }
        let (lo, hi) = padded(y.0, y.1);
        let margin = 0.05 * (hi - lo);
        Ok(LossFigure { title: title.to_string(), curves, references, x, y: (lo - margin, hi + margin) })
    }

    fn csv(&self) -> String {
        let mut out = String::from("curve,step,loss\n");
        for c in self.curves {
            for (s, l) in &c.points {
                let _ = writeln!(out, "{},{s},{l}", csv_field(&c.label));
            }
        }
        for (name, v) in self.references {
            let _ = writeln!(out, "{},,{v}", csv_field(name));
        }
        out
    }
}

impl Figure for LossFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, z: Z) -> Result<()> {
        let body = title_band(root, &self.title, z)?;
        let (lo, hi) = self.y;
        let mut chart = ChartBuilder::on(&body)
            .margin(z.i(12))
            .margin_right(z.i(22))
            .x_label_area_size(z.i(50))
            .y_label_area_size(z.i(66))
            .build_cartesian_2d(self.x.0..self.x.1, lo..hi)
            .map_err(de)?;
        let line = |c: RGBColor, w: u32| ShapeStyle::from(&c).stroke_width(z.u(w));
        let fmt = |v: &f64| fmt_num(*v);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .x_label_formatter(&fmt)
            .y_label_formatter(&fmt)
            .label_style(z.font(TICK_PX))
            .axis_desc_style(z.font(DESC_PX))
            .bold_line_style(line(GRID, 1))
            .light_line_style(TRANSPARENT)
            .axis_style(line(AXIS, 1))
            .set_all_tick_mark_size(z.i(5))
            .draw()
            .map_err(de)?;
        let lw = z.i(24);
        for (k, c) in self.curves.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(c.points.clone(), line(colour, 2)))
                .map_err(de)?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + lw, y)], line(colour, 2)));
            if c.points.len() <= 40 {
                chart.draw_series(c.points.iter().map(|&p| Circle::new(p, z.u(3), colour.filled()))).map_err(de)?;
            }
        }
        for (k, (name, v)) in self.references.iter().enumerate() {
            let colour = if k == 0 { BLACK } else { PALETTE[(self.curves.len() + k) % PALETTE.len()] };
            chart
                .draw_series(DashedLineSeries::new(vec![(self.x.0, *v), (self.x.1, *v)], z.i(9), z.i(6), line(colour, 2)))
                .map_err(de)?
                .label(format!("{name}: {}", fmt_num(*v)))
                .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + lw, y)], z.i(6), z.i(4), line(colour, 2)));
        }
        draw_legend(&mut chart, z)
    }
}
