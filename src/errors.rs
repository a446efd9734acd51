//! One way to turn an error into the text logs and messages show. Some libraries put the
//! useful part only in `source()` (tokio-postgres), and some transport errors display as
//! nothing at all (libp2p's), so `Display` alone is not enough. Formatting only: this
//! module never decides what an error means.

/// An error and its causes, `outer: inner: …`, leaving out empty texts and a cause the
/// text already ends with (io::Error displays its inner error and returns it as source).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let part = e.to_string();
        if !part.is_empty() && !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        next = e.source();
    }
    if text.is_empty() { format!("{err:?}") } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn causes_are_joined_and_repeats_and_blanks_left_out() {
        let io = std::io::Error::other("refused");
        assert_eq!(chain(&Outer("cannot connect", io)), "cannot connect: refused");
        let blank = Outer("", std::io::Error::other("port in use"));
        assert_eq!(chain(&blank), "port in use");
        let repeat = Outer("cannot connect: refused", std::io::Error::other("refused"));
        assert_eq!(chain(&repeat), "cannot connect: refused");
    }
}
