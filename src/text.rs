//! Making text from peers and files safe to print on a terminal: [`printable`] turns control characters into visible
//! escapes. Text outputs only; JSON needs nothing of this (serde_json escapes control characters itself).
//!
//! A VM name, a QEMU run state or an error text can come from a scenario file or from whatever answers on a QMP
//! socket. Printed raw, an ESC (or its one-byte C1 form, CSI) starts a sequence the terminal obeys: colours, cursor
//! moves, a new window title, even answers typed back into the shell. A newline or carriage return would fake a line
//! of output. Such a name is still shown, with the offending characters spelt out, so a person can see what is there.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `s` with every character a terminal might act on replaced by a visible escape: C0 controls (tab, newline and
/// carriage return included: a name is one line) and DEL become `\x1b`-style text, C1 controls (U+0080–U+009F),
/// the bidirectional overrides and isolates, and the Unicode line and paragraph separators become `\u{9b}`-style
/// text. Everything else, other non-ASCII letters included, is kept. Borrows when there is nothing to replace, which
/// is the common case.
///
/// The escapes are for a human reader, not a reversible encoding: a name that already contains the text `\x1b` reads
/// the same as one with an ESC.
pub fn printable(s: &str) -> Cow<'_, str> {
    let Some(first) = s.find(needs_escape) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    // `is_control` is exactly Unicode's Cc: C0, DEL and C1.
    c.is_control()
        || matches!(
            c,
            // Bidirectional marks, embeddings, overrides and isolates: they reorder what follows on the line, so
            // a name could make the columns after it read backwards ("Trojan Source").
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            // Line and paragraph separators: some terminals and viewers break the line there.
            | '\u{2028}' | '\u{2029}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        let cases = [
            ("", ""),
            ("vm1", "vm1"),
            ("web-01.qmp", "web-01.qmp"),
            ("café ü 虚拟机", "café ü 虚拟机"),
            ("a\\x1bb", "a\\x1bb"),
            ("\u{1b}[31mred\u{1b}[0m", "\\x1b[31mred\\x1b[0m"),
            ("\u{1b}]0;owned\u{7}", "\\x1b]0;owned\\x07"),
            ("a\tb", "a\\x09b"),
            ("line\nfake line", "line\\x0afake line"),
            ("back\rover", "back\\x0dover"),
            ("nul\0", "nul\\x00"),
            ("del\u{7f}", "del\\x7f"),
            ("csi\u{9b}31m", "csi\\u{9b}31m"),
            ("c1 \u{80} \u{9f}", "c1 \\u{80} \\u{9f}"),
            ("\u{a0}nbsp", "\u{a0}nbsp"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("\u{2066}iso\u{2069}", "\\u{2066}iso\\u{2069}"),
            ("one\u{2028}two", "one\\u{2028}two"),
        ];
        for (input, want) in cases {
            assert_eq!(printable(input), want, "{input:?}");
        }
    }

    #[test]
    fn clean_text_is_borrowed() {
        assert!(matches!(printable("node1"), Cow::Borrowed("node1")));
        assert!(matches!(printable("a\u{1b}"), Cow::Owned(_)));
    }

    #[test]
    fn no_escape_or_c1_byte_survives() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = format!("x{c}y");
            let p = printable(&s);
            assert!(!p.chars().any(|c| c.is_control()), "{c:?} became {p:?}");
        }
    }
}
