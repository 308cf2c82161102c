//! Reading samples from the Prometheus text exposition (`/metrics`).

/// The sum of every sample of `name` whose labels include all of `labels` (`key="value"`), or
/// 0 when there is none. `name` is the sample's full name (`..._total`, `..._count`); with no
/// labels every series of the family counts.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::metric;

    const TEXT: &str = "# HELP x_total Things.\n\
        x_total{reason=\"a\",route=\"r\"} 2\n\
        x_total{reason=\"b\",route=\"r\"} 3\n\
        x_total_other 40\n\
        y 7.5\n";

    #[test]
    fn sums_the_series_that_carry_every_label() {
        assert_eq!(metric(TEXT, "x_total", &[]), 5.0);
        assert_eq!(metric(TEXT, "x_total", &[("reason", "b")]), 3.0);
        assert_eq!(
            metric(TEXT, "x_total", &[("reason", "b"), ("route", "s")]),
            0.0
        );
        assert_eq!(metric(TEXT, "y", &[]), 7.5);
        assert_eq!(metric(TEXT, "missing", &[]), 0.0);
    }
}
