//! Turning an error chain into one line for people.

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// already contains (our errors often quote their source, which would otherwise repeat).
pub fn describe_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading x.csv: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn repeated_causes_are_dropped() {
        let e = Outer {
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(describe_error(&e), "reading x.csv: disk on fire");
    }
}
