//! Escaping text for HTML, for the pages fmnist writes: the server's web page and
//! `fmnist-train eval --report`'s index.html.

/// `text` safe inside HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_the_five_special_characters_only() {
        assert_eq!(
            super::escape(r#"a&b<c>"d'é"#),
            "a&amp;b&lt;c&gt;&quot;d&#39;é"
        );
    }
}
