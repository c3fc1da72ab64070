//! The bench's human-readable outputs: an aligned text table and an SVG bar chart.

use std::fmt::Write as _;

use super::Row;

/// `v` ms with about four significant digits.
fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 10.0 {
        format!("{v:.2}")
    } else if v >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

fn fmt_bytes(b: Option<u64>) -> String {
    let Some(b) = b else { return "n/a".into() };
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Lays out `cells` (header first) with two spaces between columns; column 0 is left-aligned,
/// the others right-aligned.
fn aligned(cells: &[Vec<String>]) -> String {
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| cells.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in cells.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = width[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
            out.push('\n');
        }
    }
    out
}

/// Workloads in first-seen order, with their eager and compiled rows.
fn by_workload(rows: &[Row]) -> Vec<(&str, Option<&Row>, Option<&Row>)> {
    let mut out: Vec<(&str, Option<&Row>, Option<&Row>)> = Vec::new();
    for r in rows.iter().filter(|r| r.mode != "reference") {
        let i = match out.iter().position(|(w, _, _)| *w == r.workload) {
            Some(i) => i,
            None => {
                out.push((&r.workload, None, None));
                out.len() - 1
            }
        };
        match r.mode.as_str() {
            "eager" => out[i].1 = Some(r),
            _ => out[i].2 = Some(r),
        }
    }
    out
}

fn speedup(eager: Option<&Row>, compiled: Option<&Row>) -> Option<f64> {
    Some(eager?.median_ms? / compiled?.median_ms?)
}

/// The text table: one line per workload (eager and compiled side by side, with the speed-up
/// eager median / compiled median), then the reference rows, then any errors.
pub fn table(rows: &[Row]) -> String {
    let time = |r: Option<&Row>| match r {
        None => ("-".to_string(), String::new()),
        Some(r) if r.error.is_some() => ("error".to_string(), String::new()),
        Some(r) => match (r.median_ms, r.min_ms, r.max_ms) {
            (Some(m), Some(lo), Some(hi)) => (fmt_ms(m), format!("{}…{}", fmt_ms(lo), fmt_ms(hi))),
            _ => ("-".to_string(), String::new()),
        },
    };
    let mut cells = vec![[
        "workload",
        "iters",
        "eager ms",
        "(min…max)",
        "compiled ms",
        "(min…max)",
        "speed-up",
        "compile ms",
        "eager peak",
        "compiled peak",
    ]
    .map(String::from)
    .to_vec()];
    for (w, e, c) in by_workload(rows) {
        let iters = e.or(c).map_or(0, |r| r.iters);
        let (em, er) = time(e);
        let (cm, cr) = time(c);
        cells.push(vec![
            w.to_string(),
            iters.to_string(),
            em,
            er,
            cm,
            cr,
            speedup(e, c).map_or("-".into(), |s| format!("{s:.2}×")),
            c.and_then(|c| c.compile_ms).map_or("-".into(), fmt_ms),
            e.map_or("-".into(), |r| fmt_bytes(r.peak_bytes)),
            c.map_or("-".into(), |r| fmt_bytes(r.peak_bytes)),
        ]);
    }
    let mut out = aligned(&cells);

    let refs: Vec<&Row> = rows.iter().filter(|r| r.mode == "reference").collect();
    if !refs.is_empty() {
        let mut cells = vec![["reference", "iters", "median ms", "(min…max)", "throughput", "isa", "threads"]
            .map(String::from)
            .to_vec()];
        for r in refs {
            let (m, range) = time(Some(r));
            let throughput = match (r.gbps, r.gflops) {
                (Some(g), _) => format!("{g:.1} GB/s"),
                (_, Some(g)) => format!("{g:.1} GFLOP/s"),
                _ => "-".into(),
            };
            cells.push(vec![
                r.workload.clone(),
                r.iters.to_string(),
                m,
                range,
                throughput,
                r.isa.clone().unwrap_or_default(),
                r.threads.map_or(String::new(), |t| t.to_string()),
            ]);
        }
        out.push('\n');
        out.push_str(&aligned(&cells));
    }
    let errors: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !errors.is_empty() {
        out.push_str("\nerrors:\n");
        for r in errors {
            let _ = writeln!(out, "  {} ({}): {}", r.workload, r.mode, r.error.as_deref().unwrap_or_default());
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const EAGER_COLOR: &str = "#4c72b0";
const COMPILED_COLOR: &str = "#dd8452";

/// An SVG bar chart of the median time per call, eager vs compiled, per workload: horizontal
/// bars on a log-scale ms axis, labelled with their values and the speed-up, with a legend.
pub fn svg_chart(rows: &[Row]) -> String {
    let groups = by_workload(rows);
    let ok = |r: Option<&Row>| r.filter(|r| r.error.is_none()).and_then(|r| r.median_ms).filter(|v| *v > 0.0);
    let values: Vec<f64> = groups.iter().flat_map(|(_, e, c)| [ok(*e), ok(*c)]).flatten().collect();
    let (lo, hi) = if values.is_empty() {
        (0, 1)
    } else {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        let (lo, hi) = (min.log10().floor() as i32, max.log10().ceil() as i32);
        (lo, if hi > lo { hi } else { lo + 1 })
    };

    let (left, right, top, row_h, bar_h, plot_w) = (230.0, 210.0, 70.0, 46.0, 16.0, 520.0);
    let width = left + plot_w + right;
    let height = top + row_h * groups.len().max(1) as f64 + 50.0;
    let x_of = |v: f64| left + (v.log10() - lo as f64) / (hi - lo) as f64 * plot_w;

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#);
    let reference = rows.iter().find(|r| r.mode == "reference");
    let machine = match reference.and_then(|r| Some((r.isa.as_deref()?, r.threads?))) {
        Some((isa, t)) => format!(" ({isa}, {t} threads)"),
        None => String::new(),
    };
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">tracegrad bench: median time per call, log scale{}</text>"#,
        xml_escape(&machine)
    );
    // Legend.
    for (i, (label, color)) in [("eager", EAGER_COLOR), ("compiled", COMPILED_COLOR)].iter().enumerate() {
        let x = left + i as f64 * 110.0;
        let _ = writeln!(s, r#"<rect x="{x}" y="34" width="14" height="14" fill="{color}"/>"#);
        let _ = writeln!(s, r#"<text x="{}" y="46">{label}</text>"#, x + 20.0);
    }
    // Decade grid lines and axis labels.
    let axis_y = top + row_h * groups.len().max(1) as f64;
    for k in lo..=hi {
        let x = x_of(10f64.powi(k));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{axis_y}" stroke="#ccc"/>"##);
        let label = if k >= 0 { format!("{}", 10f64.powi(k)) } else { format!("{:.*}", (-k) as usize, 10f64.powi(k)) };
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label} ms</text>"#, axis_y + 16.0);
    }
    let _ = writeln!(s, r##"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#333"/>"##, left + plot_w);
    if values.is_empty() {
        let _ = writeln!(s, r#"<text x="{left}" y="{}">no successful runs</text>"#, top + 20.0);
    }
    let base = x_of(10f64.powi(lo));
    for (i, (name, e, c)) in groups.iter().enumerate() {
        let y0 = top + i as f64 * row_h + (row_h - 2.0 * bar_h) / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y0 + bar_h + 4.0,
            xml_escape(name)
        );
        for (j, (r, color)) in [(*e, EAGER_COLOR), (*c, COMPILED_COLOR)].into_iter().enumerate() {
            let y = y0 + j as f64 * bar_h;
            let label = match (r, ok(r)) {
                (_, Some(v)) => {
                    let x = x_of(v);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{base:.1}" y="{y:.1}" width="{:.1}" height="{}" fill="{color}"/>"#,
                        (x - base).max(1.0),
                        bar_h - 2.0
                    );
                    (x, format!("{} ms", fmt_ms(v)))
                }
                (Some(r), None) if r.error.is_some() => (base, "failed".to_string()),
                _ => continue,
            };
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, label.0 + 4.0, y + bar_h - 5.0, label.1);
        }
        if let Some(sp) = speedup(*e, *c) {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" font-weight="bold">{sp:.2}× speed-up</text>"#,
                left + plot_w + 70.0,
                y0 + bar_h + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
