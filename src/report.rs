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

/// A binary's exit: success, or `error: …` (the whole chain, once) on stderr and status 1.
/// Plain stderr on purpose: logging may not be set up when startup fails.
pub fn exit_code<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
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
