//! A strict parser for the Prometheus text exposition format (version 0.0.4), for asserting on
//! what berth's `/metrics` serves.
//!
//! Strict on purpose: any line it does not understand is an error (a scrape that Prometheus
//! would reject must fail the test, not be skipped). Handles label values with escapes (`\\`,
//! `\"`, `\n`) and any other character (berth's route templates contain `{`, `}` and `/`),
//! `# HELP` escapes, `+Inf`/`-Inf`/`NaN`, optional timestamps, and checks histograms: every
//! sample of a `histogram` family is `_bucket{le=..}`, `_sum` or `_count`, buckets are
//! cumulative and end with `le="+Inf"` equal to `_count`.
//!
//! (The `prometheus-parse` crate was not used: it splits labels on `,`/`=` and matches them
//! with `\{[^}]+\}`, so it cannot read `route="/v2/{name}/blobs/{digest}"`, and it skips
//! lines it cannot parse instead of failing.)

use std::collections::{BTreeMap, BTreeSet};

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name -> help text (unescaped).
    pub help: BTreeMap<String, String>,
    /// Family name -> type (counter, gauge, histogram, summary, untyped).
    pub types: BTreeMap<String, String>,
}

/// One histogram series: cumulative buckets in `le` order, sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn valid_metric_name(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(is_name_start) && cs.all(is_name_char)
}

fn valid_label_name(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("not a number: {s:?}")),
    }
}

/// Unescapes a HELP text: `\\` and `\n` only.
fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut cs = s.chars();
    while let Some(c) = cs.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match cs.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            other => return Err(format!("bad escape \\{other:?} in HELP")),
        }
    }
    Ok(out)
}

/// Parses `{name="value",...}` starting at `s` (which begins with '{'); returns the labels and
/// the rest after '}'.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    let mut rest = &s[1..];
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated label set")?;
        let name = &rest[..name_end];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[name_end..].trim_start_matches([' ', '\t']);
        rest = rest
            .strip_prefix('=')
            .ok_or_else(|| format!("no '=' after label {name}"))?;
        rest = rest.trim_start_matches([' ', '\t']);
        rest = rest
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars
                .next()
                .ok_or_else(|| format!("label {name}: unterminated value"))?;
            match c {
                '"' => break i,
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {name}: bad escape {other:?}")),
                },
                '\n' => return Err(format!("label {name}: raw newline in value")),
                c => value.push(c),
            }
        };
        rest = &rest[end + 1..];
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {name}"));
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
            {
                return Some(base);
            }
        }
    }
    None
}

impl Exposition {
    /// Parses a whole exposition. Errors name the line.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (no, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            e.parse_line(line)
                .map_err(|m| format!("line {}: {m}: {line:?}", no + 1))?;
        }
        e.check_histograms()?;
        Ok(e)
    }

    fn parse_line(&mut self, line: &str) -> Result<(), String> {
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() {
            return Ok(());
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            let comment = comment.trim_start_matches([' ', '\t']);
            let mut words = comment.splitn(3, [' ', '\t']);
            match words.next() {
                Some("HELP") => {
                    let name = words.next().ok_or("HELP without a name")?;
                    if !valid_metric_name(name) {
                        return Err(format!("bad metric name {name:?}"));
                    }
                    let help = unescape_help(words.next().unwrap_or(""))?;
                    if self.help.insert(name.to_string(), help).is_some() {
                        return Err(format!("second HELP for {name}"));
                    }
                }
                Some("TYPE") => {
                    let name = words.next().ok_or("TYPE without a name")?;
                    if !valid_metric_name(name) {
                        return Err(format!("bad metric name {name:?}"));
                    }
                    let ty = words.next().unwrap_or("").trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(format!("unknown type {ty:?}"));
                    }
                    let of_family = |s: &Sample| {
                        s.name == name
                            || s.name.strip_prefix(name).is_some_and(|suffix| {
                                ["_bucket", "_sum", "_count"].contains(&suffix)
                            })
                    };
                    if self.samples.iter().any(of_family) {
                        return Err(format!("TYPE for {name} after its samples"));
                    }
                    if self
                        .types
                        .insert(name.to_string(), ty.to_string())
                        .is_some()
                    {
                        return Err(format!("second TYPE for {name}"));
                    }
                }
                _ => {} // any other comment
            }
            return Ok(());
        }
        let name_end = trimmed
            .find(|c: char| !is_name_char(c))
            .unwrap_or(trimmed.len());
        let name = &trimmed[..name_end];
        if !valid_metric_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut rest = trimmed[name_end..].trim_start_matches([' ', '\t']);
        let labels = if rest.starts_with('{') {
            let (labels, r) = parse_labels(rest)?;
            rest = r;
            labels
        } else {
            Labels::new()
        };
        let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
        let value = parse_float(fields.next().ok_or("no value")?)?;
        let timestamp_ms = match fields.next() {
            Some(t) => Some(
                t.parse::<i64>()
                    .map_err(|_| format!("bad timestamp {t:?}"))?,
            ),
            None => None,
        };
        if let Some(extra) = fields.next() {
            return Err(format!("unexpected {extra:?} after the value"));
        }
        if let Some(family) = family_of(name, &self.types) {
            let ty = &self.types[family];
            if ty == "histogram" {
                let is_bucket = name.ends_with("_bucket") && name != family;
                if name == family {
                    return Err(format!("histogram {family} sample without a suffix"));
                }
                if is_bucket != labels.contains_key("le") {
                    return Err("le label on a non-bucket sample, or a bucket without le".into());
                }
            }
        }
        if self
            .samples
            .iter()
            .any(|s| s.name == name && s.labels == labels)
        {
            return Err("duplicate series".into());
        }
        self.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
            timestamp_ms,
        });
        Ok(())
    }

    fn check_histograms(&self) -> Result<(), String> {
        for (family, ty) in &self.types {
            if ty != "histogram" {
                continue;
            }
            let count_name = format!("{family}_count");
            for count in self.samples.iter().filter(|s| s.name == count_name) {
                let h = self
                    .histogram_exact(family, &count.labels)
                    .ok_or_else(|| format!("{family}{:?}: incomplete histogram", count.labels))?;
                let mut last = (f64::NEG_INFINITY, 0.0);
                for &(le, c) in &h.buckets {
                    if le <= last.0 || c < last.1 {
                        return Err(format!(
                            "{family}{:?}: buckets not cumulative at le={le}",
                            count.labels
                        ));
                    }
                    last = (le, c);
                }
                if last.0 != f64::INFINITY || last.1 != h.count {
                    return Err(format!(
                        "{family}{:?}: +Inf bucket {} != _count {}",
                        count.labels, last.1, h.count
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every sample name (histograms as their `_bucket`/`_sum`/`_count` series).
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// Samples named `name`.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the series with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.series(name)
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// As [`Exposition::get`]; panics with the available series when absent.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let have: Vec<_> = self.series(name).map(|s| &s.labels).collect();
            panic!("no series {name}{labels:?}; have {have:?}")
        })
    }

    /// As [`Exposition::get`], 0 when the series does not exist (yet): a labelled counter
    /// appears on first increment.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over the series of `name` whose labels include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|s| {
                filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn histogram_exact(&self, family: &str, labels: &Labels) -> Option<Histogram> {
        let bucket_name = format!("{family}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .series(&bucket_name)
            .filter(|s| {
                let mut l = s.labels.clone();
                l.remove("le");
                &l == labels
            })
            .map(|s| (parse_float(&s.labels["le"]).unwrap_or(f64::NAN), s.value))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let sum = self
            .series(&format!("{family}_sum"))
            .find(|s| &s.labels == labels)?
            .value;
        let count = self
            .series(&format!("{family}_count"))
            .find(|s| &s.labels == labels)?
            .value;
        (!buckets.is_empty()).then_some(Histogram {
            buckets,
            sum,
            count,
        })
    }

    /// The histogram series of `family` with exactly `labels` (without `le`).
    #[track_caller]
    pub fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> Histogram {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            self.types.get(family).map(String::as_str),
            Some("histogram"),
            "{family} is not a histogram"
        );
        self.histogram_exact(family, &want)
            .unwrap_or_else(|| panic!("no histogram {family}{labels:?}"))
    }
}
