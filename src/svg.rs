//! A failover timeline as SVG: the client's connection attempts (green: answered, red: not),
//! and marks for the fault, Lease holder changes, announcements and the client's ARP entry.

use std::fmt::Write;
use std::time::Duration;

/// Something that happened, drawn as a labelled vertical line.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: Duration,
    pub label: String,
    /// `fault`, `lease`, `announce`, `neighbor`: picks the colour and the label row.
    pub kind: &'static str,
}

fn colour(kind: &str) -> &'static str {
    match kind {
        "fault" => "#d62728",
        "lease" => "#1f77b4",
        "announce" => "#9467bd",
        "neighbor" => "#ff7f0e",
        _ => "#555555",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders attempts (`(start, answered)`) and marks between `from` and `to`.
pub fn timeline(
    title: &str,
    attempts: &[(Duration, bool)],
    marks: &[Mark],
    from: Duration,
    to: Duration,
) -> String {
    let (w, left, right) = (1000.0, 60.0, 20.0);
    let span = (to.as_secs_f64() - from.as_secs_f64()).max(0.001);
    let x = |t: Duration| left + (t.as_secs_f64() - from.as_secs_f64()) / span * (w - left - right);
    let rows = ["fault", "lease", "announce", "neighbor"];
    let h = 120.0 + rows.len() as f64 * 18.0 + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="18" font-size="14">{}</text>"#,
        esc(title)
    );
    let (band_y, band_h) = (40.0, 40.0);
    let _ = writeln!(s, r#"<text x="4" y="{}">client</text>"#, band_y + 24.0);
    for (t, ok) in attempts.iter().filter(|(t, _)| *t >= from && *t <= to) {
        let c = if *ok { "#2ca02c" } else { "#d62728" };
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{band_y}" width="1.5" height="{band_h}" fill="{c}"/>"#,
            x(*t)
        );
    }
    // time axis, a tick every 500 ms
    let axis_y = band_y + band_h + 14.0;
    let mut t = Duration::from_millis((from.as_millis() as u64).div_ceil(500) * 500);
    while t <= to {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#999"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4:.1}s</text>"##,
            x(t),
            band_y + band_h,
            band_y + band_h + 4.0,
            axis_y + 8.0,
            (t.as_secs_f64() - from.as_secs_f64())
        );
        t += Duration::from_millis(500);
    }
    let rows_y = axis_y + 30.0;
    for (i, kind) in rows.iter().enumerate() {
        let y = rows_y + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<text x="4" y="{y}" fill="{}">{kind}</text>"#,
            colour(kind)
        );
        for m in marks
            .iter()
            .filter(|m| m.kind == *kind && m.at >= from && m.at <= to)
        {
            let _ = writeln!(
                s,
                r#"<line x1="{0:.1}" x2="{0:.1}" y1="{band_y}" y2="{1}" stroke="{2}" stroke-dasharray="3,2"/>"#,
                x(m.at),
                y - 10.0,
                colour(kind)
            );
            // Labels near the right edge grow leftwards.
            let (lx, anchor) = if x(m.at) > w - 260.0 {
                (x(m.at) - 3.0, "end")
            } else {
                (x(m.at) + 3.0, "start")
            };
            let _ = writeln!(
                s,
                r#"<text x="{lx:.1}" y="{y}" fill="{}" text-anchor="{anchor}">{}</text>"#,
                colour(kind),
                esc(&m.label)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_attempts_and_marks_inside_the_window_only() {
        let ms = Duration::from_millis;
        let svg = timeline(
            "t",
            &[(ms(0), true), (ms(100), false), (ms(5000), true)],
            &[Mark {
                at: ms(100),
                label: "link cut".into(),
                kind: "fault",
            }],
            ms(0),
            ms(1000),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches(r#"width="1.5""#).count(),
            2,
            "the attempt at 5 s is outside"
        );
        assert!(svg.contains("link cut"));
        assert!(svg.contains("#d62728") && svg.contains("#2ca02c"));
    }
}
