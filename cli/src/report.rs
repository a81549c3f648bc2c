//! How the command line prints an error: the error, then each cause in its
//! chain that adds something. Never prints a cause twice: many errors (the
//! library's, `thiserror`'s `{source}` style) already embed their source in
//! their own message.

use std::error::Error;

/// The lines to print for `e`: its message, then one `caused by:` line per
/// cause whose text none of the lines before it already holds.
pub(crate) fn error_lines(e: &dyn Error) -> Vec<String> {
    let mut lines = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // A cause already quoted above (or with nothing to say) would only
        // repeat it; its own causes may still be new, so the walk goes on.
        if !text.is_empty() && !lines.iter().any(|l| l.contains(&text)) {
            lines.push(text);
        }
        source = s.source();
    }
    lines
}

/// Prints `e` on stderr as `pagefold: <error>` and its new causes.
pub(crate) fn print_error(e: &dyn Error) {
    let lines = error_lines(e);
    let mut lines = lines.iter();
    if let Some(first) = lines.next() {
        eprintln!("pagefold: {first}");
    }
    for cause in lines {
        eprintln!("  caused by: {cause}");
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt, io};

    use pagefold::userfault::UserfaultError;

    use super::error_lines;

    /// An error that names its cause only through `source()`.
    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("loading the images failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        // Issue 13: this printed "Operation not permitted (os error 1)"
        // twice, once inside the message and once as "caused by".
        let e = UserfaultError::Unavailable(io::Error::from_raw_os_error(libc::EPERM));
        let lines = error_lines(&e);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("Operation not permitted"), "{lines:?}");
    }

    #[test]
    fn a_cause_the_message_does_not_hold_is_printed() {
        let e = Outer(io::Error::from_raw_os_error(libc::ENOENT));
        let lines = error_lines(&e);
        assert_eq!(
            lines,
            [
                "loading the images failed".to_owned(),
                io::Error::from_raw_os_error(libc::ENOENT).to_string()
            ]
        );
    }
}
