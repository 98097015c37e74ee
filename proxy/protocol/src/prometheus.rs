//! Prometheus's text exposition format, read back: what `moltghost top` takes from an edge's
//! `/metrics`. Samples only (`name{label="value",...} value [timestamp]`); comments, blank and
//! malformed lines are skipped, so a partial or odd scrape never stops the view.

/// One sample of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' name (a histogram's `_bucket`, `_sum` and `_count` are their own names).
    pub name: String,
    /// Its labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample in `text`, in order.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(sample).collect()
}

/// One line as a sample, or `None` (a comment, a blank line, something malformed).
fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The labels after a `{`, up to and past the closing `}`; values unescaped (`\\`, `\"`, `\n`).
fn label_set(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        s = &after[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_edge_exports() {
        let text = "# HELP moltghost_requests_total Answers\n# TYPE moltghost_requests_total counter\n\
                    moltghost_requests_total{agent=\"abc123\",code=\"\",route=\"/v1/chat\",status=\"200\"} 3\n\
                    moltghost_open_streams 0\n\
                    moltghost_edge_overhead_seconds_bucket{route=\"/v1/chat\",le=\"+Inf\"} 12\n\
                    moltghost_tunnel_up{pod=\"k=@127.0.0.1:51820\"} 1 1700000000000\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].label("agent"), Some("abc123"));
        assert_eq!(s[0].label("code"), Some(""));
        assert_eq!(s[0].value, 3.0);
        assert_eq!(
            (s[1].name.as_str(), s[1].labels.len()),
            ("moltghost_open_streams", 0)
        );
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[3].label("pod"), Some("k=@127.0.0.1:51820"));
    }

    #[test]
    fn escapes_and_odd_lines() {
        let s = parse("m{a=\"x\\\"y\\\\z\\n\"} +Inf\nnot a sample\n{a=\"b\"} 1\nm{a=\"open 1\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].label("a"), Some("x\"y\\z\n"));
        assert!(s[0].value.is_infinite());
    }
}
