//! Rendered figures are decoded and checked; tables round-trip through CSV and Parquet.

use pivot::prelude::*;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pivot-plot-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Decodes the PNG and checks its size and that it is not blank: many non-white pixels and colour.
fn check_png(fig: &Figure, w: u32, h: u32, min_colors: usize) -> image::RgbImage {
    let img = image::load_from_memory(&fig.png).expect("valid PNG").to_rgb8();
    assert_eq!(img.dimensions(), (w, h));
    let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(non_white > (w * h / 100) as usize, "{}: only {non_white} non-white pixels", fig.title);
    let mut colors: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colors.sort();
    colors.dedup();
    assert!(colors.len() >= min_colors, "{}: {} colours", fig.title, colors.len());
    img
}

/// Dark pixels in the title band: text was rasterised (the embedded font works).
fn has_text(img: &image::RgbImage, y0: u32, y1: u32) -> bool {
    (y0..y1).flat_map(|y| (0..img.width()).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100)).count() > 30
}

#[test]
fn curves_png_and_svg() {
    let a = Series::from_values("sft", &(0..50).map(|i| 1.0 / (1.0 + i as f64)).collect::<Vec<_>>());
    let b = Series::from_values("dpo", &(0..50).map(|i| 0.69 - 0.005 * i as f64).collect::<Vec<_>>());
    let fig = curves("loss", "step", "loss", &[a, b]).unwrap();
    let img = check_png(&fig, 800, 480, 10);
    assert!(has_text(&img, 0, 40), "title text rendered");
    // Both series colours appear.
    for c in [series_color(0), series_color(1)] {
        assert!(img.pixels().any(|p| p.0 == [c.0, c.1, c.2]), "series colour {c:?} missing");
    }
    assert!(fig.svg.starts_with("<svg") && fig.svg.contains("sft") && fig.svg.contains("dpo"));
    fig.save(tmp("curves.png")).unwrap();
    fig.save(tmp("curves.svg")).unwrap();
    assert_eq!(std::fs::read(tmp("curves.png")).unwrap(), fig.png);
    assert!(fig.save(tmp("curves.jpg")).is_err());
    let bundle = fig.mime_bundle();
    assert!(bundle.data.contains_key("image/png"));
    assert!(curves("empty", "x", "y", &[]).is_err());
}

#[test]
fn bars_with_spread_and_heatmap() {
    let groups = [
        BarGroup::new("base", vec![0.70, 0.72, 0.71]),
        BarGroup::new("sft", vec![0.73, 0.74, 0.735]),
        BarGroup::new("dpo", vec![0.76, 0.75, 0.77]),
    ];
    assert!((groups[0].mean() - 0.71).abs() < 1e-12 && (groups[0].std() - 0.01).abs() < 1e-12);
    let fig = bars("top-1", "accuracy", &groups).unwrap();
    check_png(&fig, fig.width, 480, 6);
    assert!(fig.svg.contains("dpo"));

    let grid: Vec<Vec<f64>> = (0..6).map(|i| (0..4).map(|j| (i * j) as f64 / 15.0).collect()).collect();
    let fig = heatmap("alignment", "LM layer", "vision layer", &grid, Some((5, 3))).unwrap();
    let img = check_png(&fig, 760, 560, 30);
    // Viridis extremes present: dark purple (low) and yellow (high).
    assert!(img.pixels().any(|p| p.0[0] < 80 && p.0[1] < 20 && p.0[2] > 60));
    assert!(img.pixels().any(|p| p.0[0] > 200 && p.0[1] > 200 && p.0[2] < 80));
    assert!(heatmap("bad", "x", "y", &[vec![1.0], vec![1.0, 2.0]], None).is_err());
}

#[test]
fn image_grid_and_seg_comparison() {
    let a = image::RgbImage::from_pixel(32, 24, image::Rgb([255, 0, 0]));
    let b = image::RgbImage::from_pixel(32, 24, image::Rgb([0, 0, 255]));
    let fig = image_grid("grid", &[("red".into(), a.clone()), ("blue".into(), b)], 2).unwrap();
    let img = check_png(&fig, fig.width, fig.height, 3);
    assert!(img.pixels().filter(|p| p.0 == [255, 0, 0]).count() >= 32 * 24);
    assert!(img.pixels().filter(|p| p.0 == [0, 0, 255]).count() >= 32 * 24);
    assert!(has_text(&img, 0, 30));
    assert!(fig.svg.contains("data:image/png;base64,"));

    let truth = Tensor::from_slice(&[0i64, 1, 2, 255]).view([2, 2]).repeat([12, 16]);
    let pred = Tensor::from_slice(&[0i64, 1, 1, 2]).view([2, 2]).repeat([12, 16]);
    let fig = seg_comparison(&[a], &[truth], &[pred], 3).unwrap();
    let img = check_png(&fig, fig.width, fig.height, 5);
    let pal = seg_palette(3);
    assert!(img.pixels().any(|p| p.0 == pal[2]));
    assert_ne!(pal[1], pal[2]);

    let map = Tensor::linspace(0.0, 1.0, 16, (Kind::Float, Device::Cpu)).view([4, 4]);
    let ov = overlay(&image::RgbImage::from_pixel(40, 40, image::Rgb([128, 128, 128])), &map);
    let fig = Figure::from_image("overlay", &ov).unwrap();
    check_png(&fig, 40, 40, 10);
}

#[test]
fn runs_table_roundtrip_and_bars() {
    let mut runs = Runs::new();
    for (stage, seed, top1) in [("sft", 0, 0.71), ("sft", 1, 0.72), ("dpo", 0, 0.75), ("dpo", 1, 0.77)] {
        runs.add_metrics(&[("encoder", "siglip2-b16"), ("stage", stage)], Some(seed), &[("top1".into(), top1)]);
    }
    runs.add_metrics(&[("encoder", "siglip2-b16"), ("stage", "base")], None, &[("miou".into(), 0.3)]);
    let df = runs.df();
    assert_eq!(df.height(), 5);
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    assert_eq!(names, vec!["encoder", "stage", "seed", "top1", "miou"]);
    let text = runs.to_string();
    assert!(text.contains("top1") && text.contains("dpo"), "{text}");
    let html = runs.to_html();
    assert!(html.starts_with("<table") && html.matches("<tr>").count() == 6);
    assert!(runs.mime_bundle().data.contains_key("text/html"));

    runs.save_csv(tmp("runs.csv")).unwrap();
    let back = Runs::read_csv(tmp("runs.csv")).unwrap();
    assert_eq!(back.records(), runs.records());
    runs.save_parquet(tmp("runs.parquet")).unwrap();
    let bytes = std::fs::read(tmp("runs.parquet")).unwrap();
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));

    let fig = runs.plot_bars("top1").unwrap();
    check_png(&fig, fig.width, 480, 6);
    assert!(fig.svg.contains("sft") && fig.svg.contains("dpo") && !fig.svg.contains("base"));
    assert!(runs.plot_bars("nope").is_err());
}

/// Pixels within `tolerance` of this colour in every channel.
fn count_near(img: &image::RgbImage, rgb: [u8; 3], tolerance: u8) -> usize {
    img.pixels().filter(|p| p.0.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) <= tolerance)).count()
}

#[test]
fn study_table_forest_plot_and_html() {
    let control = vec![0.50, 0.52, 0.49, 0.51, 0.50];
    let shifted = |d: [f64; 5]| control.iter().zip(d).map(|(c, d)| c + d).collect::<Vec<_>>();
    let comparisons = vec![
        PairedComparison::new("probe top-1", shifted([0.020, 0.025, 0.030, 0.022, 0.028]), control.clone()).unwrap(),
        PairedComparison::new("patch-seg recall", shifted([-0.030, -0.025, -0.035, -0.028, -0.032]), control.clone()).unwrap(),
        PairedComparison::new("choice accuracy", shifted([0.03, -0.04, 0.05, -0.02, 0.01]), control.clone())
            .unwrap()
            .with_smallest_effect(0.02)
            .unwrap(),
    ];
    let table = StudyTable::new(comparisons, &StudyOptions::default()).unwrap();
    let verdicts: Vec<Verdict> = table.results.iter().map(|r| r.verdict).collect();
    assert_eq!(verdicts, [Verdict::Reproduced, Verdict::Contradicted, Verdict::Inconclusive]);

    let fig = table.forest_plot().unwrap();
    fig.save(tmp("forest.png")).unwrap();
    fig.save(tmp("forest.svg")).unwrap();
    let img = check_png(&fig, 900, 170 + 3 * 44, 10);
    assert!(has_text(&img, 0, 40), "title text rendered");
    // One bar per verdict colour (drawn at 35 % over white), the thin t lines in full colour,
    // the δ mark, and the reference line at 0 between the contradicted and reproduced rows.
    let over_white = |[r, g, b]: [u8; 3]| {
        let mix = |c: u8| (0.35 * c as f64 + 0.65 * 255.0).round() as u8;
        [mix(r), mix(g), mix(b)]
    };
    for (name, rgb) in [("reproduced", [44, 160, 44]), ("contradicted", [214, 39, 40]), ("inconclusive", [127, 127, 127])] {
        let bar = count_near(&img, over_white(rgb), 2);
        assert!(bar > 200, "{name} bar: {bar} pixels near {:?}", over_white(rgb));
        assert!(count_near(&img, rgb, 0) > 40, "{name} line and note: {} pixels", count_near(&img, rgb, 0));
    }
    assert!(count_near(&img, [118, 42, 131], 0) > 30, "smallest-effect mark");
    for label in ["probe top-1", "patch-seg recall", "choice accuracy", "reproduced", "smallest effect of interest"] {
        assert!(fig.svg.contains(label), "SVG lacks {label}");
    }

    let html = table.to_html();
    std::fs::write(tmp("study.html"), &html).unwrap();
    assert_eq!(html.matches("<tr>").count(), 4, "{html}");
    for column in ["measure", "mean Δ", "95 % t CI", "95 % bootstrap CI", "Holm-adjusted CI", "paired t p", "Wilcoxon p", "Holm p", "verdict"] {
        assert!(html.contains(&format!(">{column}</th>")), "HTML lacks column {column}");
    }
    let bundle = table.mime_bundle();
    // The table stays the text part (the REPL shows a PNG instead of the text, so there is none).
    assert!(bundle.data["text/html"].as_str().unwrap().contains("<img") && !bundle.data.contains_key("image/png"));
    assert_eq!(bundle.plain_text(), table.to_string());

    // Bad rows are errors that name the row.
    let bad = ForestPlot::new("t", "x").row(ForestRow::new("a", 0.0, (-1.0, 1.0))).row(ForestRow::new("b", 0.0, (1.0, -1.0)));
    let err = bad.render().unwrap_err().to_string();
    assert!(err.contains("row 1 (`b`)"), "{err}");
    assert!(ForestPlot::new("t", "x").render().is_err());
}
