//! Recipients CSV ingestion over arbitrary bytes.
//!
//! Input: the first byte picks `field_max_bytes` (tiny limits exercise the over-long-field
//! path), the rest is written to a temporary file and read with [`Recipients`].
//!
//! Invariants: never a panic; opening either fails with an error or yields a header with an
//! `email` column; every row is `Valid` or `Invalid` with a line number >= 1 that is after the
//! previous row's and within the file's line count; a valid row has one value per column, no
//! value over the limit, and an address that passes `validate_address`; an invalid row has a
//! reason; reading a regular file ends without an I/O error.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use governor::campaign::{Recipients, Row, validate_address};
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!("governor-fuzz-csv-{}.csv", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, content)) = data.split_first() else {
        return;
    };
    let field_max = [1, 4, 16, 64, 65536][usize::from(pick) % 5];
    let p = path();
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(content).unwrap();
    drop(f);

    let Ok(mut r) = Recipients::open(p, field_max) else {
        return;
    };
    let fields = r.fields().to_vec();
    let email_col = r.email_column();
    assert!(fields[email_col].eq_ignore_ascii_case("email"));
    // A line is ended by LF, CRLF or a lone CR.
    let line_ends = content
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && content.get(i + 1) != Some(&b'\n')))
        .count() as u64;
    let mut last = 0u64;
    for row in r.by_ref() {
        let line = row.line();
        assert!(line > last, "line {line} after line {last}: {row:?}");
        assert!(
            line <= line_ends + 1,
            "line {line} of {line_ends} line ends"
        );
        last = line;
        match row {
            Row::Valid { email, values, .. } => {
                assert_eq!(values.len(), fields.len());
                assert!(values.iter().all(|v| v.len() <= field_max));
                assert_eq!(email, values[email_col].trim_matches([' ', '\t']));
                assert_eq!(validate_address(&email), Ok(()));
            }
            Row::Invalid { reason, .. } => assert!(!reason.is_empty()),
        }
    }
    assert!(r.take_error().is_none(), "I/O error reading a regular file");
});
