//! Bad usage that only shows after parsing (overlapping pool ranges, timers that contradict
//! each other, …): the daemon stops before touching anything, and `tunnel-ctl` exits with
//! status 2 as for clap's own errors (SPEC §10: 0 success, 1 runtime error, 2 bad usage).

/// What the operator wrote cannot work; the text names the flag and says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// Whether `e` (or one of its causes) is bad usage.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<UsageError>())
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn usage_is_found_under_context() {
        let e = Err::<(), _>(usage("--pool: pool ranges overlap at 198.51.100.3"))
            .context("starting the server")
            .unwrap_err();
        assert!(is_usage(&e));
        assert!(!is_usage(&anyhow::anyhow!("no such device")));
    }
}
