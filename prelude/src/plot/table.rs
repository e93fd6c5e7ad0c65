//! `Runs`: result rows keyed by provenance, held as a polars DataFrame.

use super::charts::{BarGroup, bars};
use super::figure::Figure;
use crate::error::{PivotError, Result};
use crate::runtime::{MimeBundle, Rich, html_escape};
use polars::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Something that yields named scalar metrics (reports of probes and analyses).
pub trait Metrics {
    fn metrics(&self) -> Vec<(String, f64)>;
}

/// One result row: provenance (encoder, stage, LM, data set, ...), seed and metrics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunRecord {
    pub provenance: BTreeMap<String, String>,
    pub seed: Option<i64>,
    pub metrics: BTreeMap<String, f64>,
}

/// A table of runs. Provenance columns are strings, then `seed` (int, nullable), then one f64
/// column per metric (null where a run lacks it). Rows keep insertion order.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    records: Vec<RunRecord>,
    df: DataFrame,
}

fn pe(e: PolarsError) -> PivotError {
    PivotError::invalid(format!("polars: {e}"))
}

impl Runs {
    pub fn new() -> Self {
        Runs::default()
    }

    /// Adds a row from provenance pairs, an optional seed and a report's metrics.
    pub fn add(&mut self, provenance: &[(&str, &str)], seed: Option<i64>, report: &dyn Metrics) -> &mut Self {
        self.add_metrics(provenance, seed, &report.metrics())
    }

    /// Adds a row from explicit metrics.
    pub fn add_metrics(&mut self, provenance: &[(&str, &str)], seed: Option<i64>, metrics: &[(String, f64)]) -> &mut Self {
        self.records.push(RunRecord {
            provenance: provenance.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            seed,
            metrics: metrics.iter().cloned().collect(),
        });
        self.rebuild();
        self
    }

    pub fn records(&self) -> &[RunRecord] {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The table as a polars DataFrame (for filtering, joins, group-bys).
    pub fn df(&self) -> &DataFrame {
        &self.df
    }

    fn key_columns(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for r in &self.records {
            for k in r.provenance.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys
    }

    fn metric_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        for r in &self.records {
            for k in r.metrics.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
        cols
    }

    fn rebuild(&mut self) {
        let n = self.records.len();
        let mut cols: Vec<Column> = Vec::new();
        for k in self.key_columns() {
            let v: Vec<Option<String>> = self.records.iter().map(|r| r.provenance.get(&k).cloned()).collect();
            cols.push(Column::new(k.as_str().into(), v));
        }
        if self.records.iter().any(|r| r.seed.is_some()) {
            let v: Vec<Option<i64>> = self.records.iter().map(|r| r.seed).collect();
            cols.push(Column::new("seed".into(), v));
        }
        for k in self.metric_columns() {
            let v: Vec<Option<f64>> = self.records.iter().map(|r| r.metrics.get(&k).copied()).collect();
            cols.push(Column::new(k.as_str().into(), v));
        }
        // Column names are unique by construction, so this cannot fail except on a provenance key
        // named "seed" or equal to a metric; fall back to an empty frame rather than panic.
        self.df = DataFrame::new(n, cols).unwrap_or_default();
    }

    pub fn save_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut f = std::fs::File::create(path).map_err(|e| PivotError::file(path, e))?;
        let mut df = self.df.clone();
        CsvWriter::new(&mut f).finish(&mut df).map_err(|e| PivotError::file(path, e))
    }

    pub fn save_parquet(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let f = std::fs::File::create(path).map_err(|e| PivotError::file(path, e))?;
        let mut df = self.df.clone();
        ParquetWriter::new(f).finish(&mut df).map(|_| ()).map_err(|e| PivotError::file(path, e))
    }

    /// Reads back a table written by [`Runs::save_csv`] (`seed` as int, other numeric columns as metrics).
    pub fn read_csv(path: impl AsRef<Path>) -> Result<Runs> {
        let path = path.as_ref();
        let df = CsvReadOptions::default()
            .with_has_header(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
            .map_err(|e| PivotError::file(path, e))?;
        Runs::from_df(&df)
    }

    /// Builds runs from a DataFrame: string columns are provenance, `seed` the seed, numeric columns metrics.
    pub fn from_df(df: &DataFrame) -> Result<Runs> {
        let mut runs = Runs::new();
        let n = df.height();
        let mut recs = vec![RunRecord::default(); n];
        for col in df.columns() {
            let name = col.name().to_string();
            let s = col.as_materialized_series();
            if name == "seed" {
                let c = s.cast(&DataType::Int64).map_err(pe)?;
                for (r, v) in recs.iter_mut().zip(c.i64().map_err(pe)?.iter()) {
                    r.seed = v;
                }
            } else if s.dtype().is_primitive_numeric() {
                let c = s.cast(&DataType::Float64).map_err(pe)?;
                for (r, v) in recs.iter_mut().zip(c.f64().map_err(pe)?.iter()) {
                    if let Some(v) = v {
                        r.metrics.insert(name.clone(), v);
                    }
                }
            } else {
                let c = s.cast(&DataType::String).map_err(pe)?;
                for (r, v) in recs.iter_mut().zip(c.str().map_err(pe)?.iter()) {
                    if let Some(v) = v {
                        r.provenance.insert(name.clone(), v.to_string());
                    }
                }
            }
        }
        runs.records = recs;
        runs.rebuild();
        Ok(runs)
    }

    /// One bar per provenance group (all provenance columns joined), seeds as the spread.
    pub fn plot_bars(&self, metric: &str) -> Result<Figure> {
        let keys = self.key_columns();
        let mut groups: Vec<BarGroup> = Vec::new();
        for r in &self.records {
            let Some(&v) = r.metrics.get(metric) else { continue };
            let label = keys.iter().filter_map(|k| r.provenance.get(k).cloned()).collect::<Vec<_>>().join(" / ");
            match groups.iter_mut().find(|g| g.label == label) {
                Some(g) => g.values.push(v),
                None => groups.push(BarGroup::new(label, vec![v])),
            }
        }
        if groups.is_empty() {
            let have = self.metric_columns().join(", ");
            return Err(PivotError::invalid(format!("plot_bars: no run has metric `{metric}` (available: {have})")));
        }
        bars(metric, metric, &groups)
    }

    /// HTML table (Jupyter).
    pub fn to_html(&self) -> String {
        let keys = self.key_columns();
        let metrics = self.metric_columns();
        let has_seed = self.records.iter().any(|r| r.seed.is_some());
        let mut s = String::from("<table class=\"pivot-runs\"><thead><tr>");
        for k in keys.iter().chain(has_seed.then(|| "seed".to_string()).iter()).chain(&metrics) {
            s += &format!("<th>{}</th>", html_escape(k));
        }
        s += "</tr></thead><tbody>";
        for r in &self.records {
            s += "<tr>";
            for k in &keys {
                s += &format!("<td>{}</td>", html_escape(r.provenance.get(k).map_or("", |v| v)));
            }
            if has_seed {
                s += &format!("<td>{}</td>", r.seed.map_or(String::new(), |v| v.to_string()));
            }
            for m in &metrics {
                s += &format!("<td style=\"text-align:right\">{}</td>", r.metrics.get(m).map_or(String::new(), |v| format!("{v:.4}")));
            }
            s += "</tr>";
        }
        s + "</tbody></table>"
    }
}

impl std::fmt::Display for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.df)
    }
}

impl Rich for Runs {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string()).with_html(self.to_html())
    }
}
