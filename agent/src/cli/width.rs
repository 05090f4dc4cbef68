//! How wide the tables may be: `COLUMNS` when set (what shells export, and how a user or a test
//! asks for a width), else the terminal's width when stdout is one, else 120 columns (piped
//! output: a pager or a file). Full text is always in `--output json`.

/// Used when neither `COLUMNS` nor a terminal says otherwise.
pub const DEFAULT_WIDTH: u16 = 120;
/// Narrower than this, a table cannot hold its columns at all.
const MIN_WIDTH: u16 = 40;

pub fn table_width() -> u16 {
    let from_env = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<u16>().ok());
    pick(
        from_env,
        terminal_size::terminal_size_of(std::io::stdout()).map(|(w, _)| w.0),
    )
}

fn pick(columns: Option<u16>, terminal: Option<u16>) -> u16 {
    columns
        .filter(|c| *c > 0)
        .or(terminal)
        .unwrap_or(DEFAULT_WIDTH)
        .max(MIN_WIDTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_then_terminal_then_default() {
        assert_eq!(pick(Some(90), Some(200)), 90);
        assert_eq!(pick(None, Some(200)), 200);
        assert_eq!(pick(Some(0), None), DEFAULT_WIDTH);
        assert_eq!(pick(None, None), DEFAULT_WIDTH);
        assert_eq!(pick(Some(10), None), MIN_WIDTH);
    }
}
