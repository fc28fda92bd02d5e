//! Agents' output as a chat shows it: compilers, test runners and shells write for a
//! terminal, and their escape sequences (colours, cursor moves, OSC hyperlinks, window
//! titles) would reach the room as literal junk. [`chat_text`] runs the text through
//! a terminal parser (`vte`) and keeps what a reader of the terminal would read:
//!
//! - every escape sequence (CSI, OSC ended by BEL or ST, DCS, other `ESC` sequences)
//!   is dropped, with its parameters; an unfinished one at the end is dropped too;
//! - a carriage return starts the line over (a progress bar redrawn in place,
//!   `50%\r60%\r`): a line shows its last non-empty redraw, and `\r\n` is a line end;
//! - other control characters (backspace, bell, C1 controls…) are dropped; line
//!   feeds and tabs are kept.
//!
//! The bridge cleans what it shows (progress, results, agents' error texts), not what
//! users type.

use vte::{Parser, Perform};

/// `text` without terminal escape sequences, its `\r` redraws resolved (see the
/// module's documentation). Text without an `ESC`, `\r` or other control character
/// comes back as it is.
pub fn chat_text(text: &str) -> String {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.to_string();
    }
    let mut screen = Screen {
        out: String::with_capacity(text.len()),
        line_start: 0,
        redraw: false,
    };
    Parser::new().advance(&mut screen, text.as_bytes());
    screen.out
}

/// What the parser leaves: the text shown so far.
struct Screen {
    out: String,
    /// Where the current line begins in `out`.
    line_start: usize,
    /// A carriage return came on this line: the next character shown starts it over.
    redraw: bool,
}

impl Screen {
    fn show(&mut self, c: char) {
        if self.redraw {
            self.out.truncate(self.line_start);
            self.redraw = false;
        }
        self.out.push(c);
    }
}

impl Perform for Screen {
    fn print(&mut self, c: char) {
        // The parser prints C1 controls met as UTF-8 (U+0080..U+009F) and DEL.
        if !c.is_control() {
            self.show(c);
        }
    }

    fn execute(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                self.out.push('\n');
                self.line_start = self.out.len();
                self.redraw = false;
            }
            b'\t' => self.show('\t'),
            b'\r' => self.redraw = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chat_text;
    use proptest::prelude::*;

    /// A piece of terminal output, and what a chat should show of it.
    fn piece() -> impl Strategy<Value = (String, String)> {
        let text = "[^\\p{Cc}]{1,12}".prop_map(|t| (t.clone(), t));
        let params = prop::collection::vec(0u16..300, 0..4)
            .prop_map(|p| p.iter().map(u16::to_string).collect::<Vec<_>>().join(";"));
        prop_oneof![
            4 => text,
            1 => Just(("\n".to_string(), "\n".to_string())),
            1 => Just(("\t".to_string(), "\t".to_string())),
            2 => (params, prop::sample::select(vec!['m', 'K', 'G', 'A', 'H', 'J']))
                .prop_map(|(p, f)| (format!("\x1b[{p}{f}"), String::new())),
            1 => ("[ -~]{0,20}", any::<bool>()).prop_map(|(url, bel)| {
                let end = if bel { "\x07" } else { "\x1b\\" };
                (format!("\x1b]8;;{url}{end}"), String::new())
            }),
            1 => Just(("\x1b(B".to_string(), String::new())),
            1 => Just(("\x07".to_string(), String::new())),
        ]
    }

    proptest! {
        /// Colours, cursor moves and hyperlinks around any text leave the text.
        #[test]
        fn escapes_around_text_leave_the_text(
            pieces in prop::collection::vec(piece(), 0..30),
        ) {
            let input: String = pieces.iter().map(|(i, _)| i.as_str()).collect();
            let want: String = pieces.iter().map(|(_, w)| w.as_str()).collect();
            prop_assert_eq!(chat_text(&input), want);
        }

        /// Whatever comes in, what goes out has no control character but newlines and
        /// tabs, and cleaning it again changes nothing.
        #[test]
        fn anything_comes_out_clean_and_stays_so(input in "(\\PC|\\p{Cc}|\x1b\\[|\x1b\\]|\r){0,60}") {
            let once = chat_text(&input);
            prop_assert!(!once.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{:?}", once);
            prop_assert_eq!(chat_text(&once), once.clone());
        }
    }

    #[test]
    fn plain_text_is_kept_as_it_is() {
        for text in ["", "hello", "a\tb\nc\n", "é ü ✓ 日本", "trailing\n\n"] {
            assert_eq!(chat_text(text), text);
        }
    }

    #[test]
    fn colours_and_styles_are_dropped() {
        assert_eq!(chat_text("\x1b[31mred\x1b[0m"), "red");
        assert_eq!(
            chat_text("\x1b[1;32m   Compiling\x1b[m agentd v0.1.0\n"),
            "   Compiling agentd v0.1.0\n"
        );
        // 256 colours and true colour, with ':' sub-parameters.
        assert_eq!(
            chat_text("\x1b[38;5;196mx\x1b[38:2::255:0:0my\x1b[39m"),
            "xy"
        );
        // An 8-bit CSI (U+009B) met as UTF-8 is a control: dropped.
        assert_eq!(chat_text("a\u{9b}b"), "ab");
    }

    #[test]
    fn osc_hyperlinks_and_titles_are_dropped_keeping_the_link_text() {
        // ST-terminated (ESC \) and BEL-terminated.
        assert_eq!(
            chat_text("see \x1b]8;;https://example.com/a?b=c\x1b\\the docs\x1b]8;;\x1b\\."),
            "see the docs."
        );
        assert_eq!(chat_text("\x1b]8;;file:///tmp/x\x07x\x1b]8;;\x07"), "x");
        assert_eq!(chat_text("\x1b]0;make: building\x07done"), "done");
    }

    #[test]
    fn cursor_moves_erases_and_other_sequences_are_dropped() {
        assert_eq!(chat_text("\x1b[2K\x1b[1Gstep 3\x1b[K"), "step 3");
        assert_eq!(
            chat_text("\x1b[?25lhidden cursor\x1b[?25h"),
            "hidden cursor"
        );
        assert_eq!(chat_text("\x1b[3A\x1b[10;20Hat"), "at");
        // Two-byte ESC sequences (keypad mode, charset selection) and a DCS.
        assert_eq!(chat_text("\x1b=\x1b(Bok\x1b>"), "ok");
        assert_eq!(chat_text("\x1bPq#0;2;0;0;0\x1b\\after"), "after");
    }

    #[test]
    fn a_carriage_return_redraw_keeps_the_last_one_of_the_line() {
        assert_eq!(chat_text("50%\r60%\r100%\n"), "100%\n");
        assert_eq!(chat_text("50%\r60%\r"), "60%");
        assert_eq!(chat_text("50%\r60%\r\ndone\n"), "60%\ndone\n");
        // A Windows line end is a line end.
        assert_eq!(chat_text("one\r\ntwo\r\n"), "one\ntwo\n");
        // The lines before the redrawn one are kept.
        assert_eq!(
            chat_text("start\n\x1b[2K\r[=>  ] 1/3\r\x1b[2K[==> ] 2/3\r\x1b[2K[===] 3/3\nend"),
            "start\n[===] 3/3\nend"
        );
        assert_eq!(chat_text("\rleading"), "leading");
        assert_eq!(chat_text("x\r\ty"), "\ty");
    }

    #[test]
    fn other_control_characters_are_dropped_but_tabs_and_newlines_kept() {
        assert_eq!(
            chat_text("bell\x07 back\x08space\x00\x7f\x0c"),
            "bell backspace"
        );
        assert_eq!(chat_text("a\tb\nc"), "a\tb\nc");
    }

    #[test]
    fn an_unfinished_sequence_at_the_end_is_dropped() {
        assert_eq!(chat_text("text\x1b"), "text");
        assert_eq!(chat_text("text\x1b[31"), "text");
        assert_eq!(chat_text("text\x1b]8;;http://x"), "text");
        // A lone ESC before text starts a two-byte sequence that eats one character,
        // as a terminal does.
        assert_eq!(chat_text("a\x1bZb"), "ab");
    }

    #[test]
    fn cleaning_twice_changes_nothing_more() {
        for text in [
            "\x1b[31mred\x1b[0m\r\nblue\r",
            "50%\r60%\r",
            "\x1b]8;;u\x07l\x1b]8;;\x07\tx\x08",
        ] {
            let once = chat_text(text);
            assert_eq!(chat_text(&once), once, "{text:?}");
            assert!(!once
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'));
        }
    }
}
