//! How an error reaches the user: one line, the outermost message first, then each cause
//! that message does not already say.

/// `e` and its causes as one line. Many errors put their cause's text in their own message
/// *and* report it as their source (`thiserror`'s `{source}`), so printing the whole chain
/// would say it twice ("X: the peer closed: the peer closed"); a cause already said is left
/// out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says its cause and also reports it as its source.
    #[derive(Debug)]
    struct Outer {
        source: std::io::Error,
    }

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "talking to the monitor of VM a: {}", self.source)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn causes_already_said_are_said_once() {
        let inner = std::io::Error::other("the peer closed the connection");
        let e = anyhow::Error::new(Outer { source: inner });
        assert_eq!(
            error_line(&e),
            "talking to the monitor of VM a: the peer closed the connection"
        );
        let e = anyhow::anyhow!("bottom").context("middle").context("top");
        assert_eq!(error_line(&e), "top: middle: bottom");
    }
}
