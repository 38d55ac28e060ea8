//! A small CSV reader, and the steps-to-target table the `cbs` binary reads.
//!
//! The reader takes comma-separated fields, one record per line, with RFC 4180 quoting inside a
//! line (`"a, b"`, `"say ""hi"""`); fields that are not quoted are trimmed. Blank lines and lines
//! starting with `#` are skipped, so a data file can say where it came from. Records may not span
//! lines.
//!
//! The steps-to-target table has a header naming its columns, in any order: `group`,
//! `batch_size`, `steps` (required) and `n_params`, `tokens` (optional; a cell may be left empty).
//! Every error names the line.

use std::path::Path;

use crate::analysis::cbs::CbsRow;
use crate::error::{Error, Result};

/// One record of a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in the file.
    pub line: usize,
    /// The fields, unquoted.
    pub fields: Vec<String>,
}

/// Splits `text` into records. The error is `(line, reason)`.
pub fn parse_records(text: &str) -> std::result::Result<Vec<Record>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields = split_line(raw).map_err(|reason| (line, reason))?;
        records.push(Record { line, fields });
    }
    Ok(records)
}

/// Splits one line into fields.
fn split_line(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        // Start of a field.
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut field = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted field".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            fields.push(field);
            match chars.next() {
                None => return Ok(fields),
                Some(',') => continue,
                Some(c) => {
                    return Err(format!(
                        "unexpected `{c}` after the closing quote of field {}",
                        fields.len()
                    ))
                }
            }
        } else {
            let mut field = String::new();
            loop {
                match chars.next() {
                    None => {
                        fields.push(field.trim().to_string());
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => {
                        return Err(format!(
                            "a quote inside unquoted field {} (quote the whole field)",
                            fields.len() + 1
                        ))
                    }
                    Some(c) => field.push(c),
                }
            }
            fields.push(field.trim().to_string());
        }
    }
}

/// The columns of the steps-to-target table.
const REQUIRED: [&str; 3] = ["group", "batch_size", "steps"];
const OPTIONAL: [&str; 2] = ["n_params", "tokens"];

/// Reads a steps-to-target table from `path` (see the module documentation).
pub fn read_cbs_csv(path: &Path) -> Result<Vec<CbsRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    parse_cbs_csv(&text, path)
}

/// Parses a steps-to-target table; `source` names the file in errors.
pub fn parse_cbs_csv(text: &str, source: &Path) -> Result<Vec<CbsRow>> {
    let fail = |line: usize, reason: String| Error::file(source, format!("line {line}: {reason}"));
    let records = parse_records(text).map_err(|(line, reason)| fail(line, reason))?;
    let Some((header, body)) = records.split_first() else {
        return Err(Error::file(
            source,
            "empty: expected a header with columns group,batch_size,steps",
        ));
    };
    let mut columns: [Option<usize>; 5] = [None; 5];
    for (i, name) in header.fields.iter().enumerate() {
        let Some(k) = REQUIRED.iter().chain(&OPTIONAL).position(|c| c == name) else {
            return Err(fail(
                header.line,
                format!(
                    "unknown column `{name}` (known: group, batch_size, steps, n_params, tokens)"
                ),
            ));
        };
        if columns[k].is_some() {
            return Err(fail(header.line, format!("column `{name}` appears twice")));
        }
        columns[k] = Some(i);
    }
    let missing: Vec<&str> = REQUIRED
        .iter()
        .zip(&columns)
        .filter(|(_, c)| c.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(fail(
            header.line,
            format!(
                "missing column(s) {} (the header must name group, batch_size, steps)",
                missing.join(", ")
            ),
        ));
    }
    let width = header.fields.len();
    let mut rows = Vec::with_capacity(body.len());
    for record in body {
        let line = record.line;
        if record.fields.len() != width {
            return Err(fail(
                line,
                format!(
                    "{} field(s), but the header has {width}",
                    record.fields.len()
                ),
            ));
        }
        let cell = |k: usize| columns[k].map(|i| record.fields[i].as_str());
        let group = cell(0).unwrap_or_default();
        if group.is_empty() {
            return Err(fail(line, "column `group` is empty".into()));
        }
        let number = |k: usize| -> Result<Option<f64>> {
            let name = REQUIRED
                .iter()
                .chain(&OPTIONAL)
                .nth(k)
                .copied()
                .unwrap_or("");
            match cell(k) {
                None | Some("") => Ok(None),
                Some(s) => match s.parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                    Ok(x) => Err(fail(
                        line,
                        format!("group `{group}`: `{name}` must be finite and > 0, got {x}"),
                    )),
                    Err(_) => Err(fail(
                        line,
                        format!("group `{group}`: `{name}` is not a number: `{s}`"),
                    )),
                },
            }
        };
        let required = |k: usize| -> Result<f64> {
            number(k)?.ok_or_else(|| fail(line, format!("column `{}` is empty", REQUIRED[k])))
        };
        rows.push(CbsRow {
            group: group.to_string(),
            batch_size: required(1)?,
            steps: required(2)?,
            n_params: number(3)?,
            tokens: number(4)?,
        });
    }
    if rows.is_empty() {
        return Err(Error::file(source, "no data rows after the header"));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<CbsRow>> {
        parse_cbs_csv(text, Path::new("t.csv"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn records_and_quoting() {
        let recs = parse_records("# note\n\na, \"b, c\" ,\"say \"\"hi\"\"\"\r\n x ,,\n").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].line, 3);
        assert_eq!(recs[0].fields, ["a", "b, c", "say \"hi\""]);
        assert_eq!(recs[1].fields, ["x", "", ""]);
        assert_eq!(parse_records("a,\"b\n").unwrap_err().0, 1);
        assert!(parse_records("a,\"b\"c\n").is_err());
        assert!(parse_records("a,b\"c\n").is_err());
    }

    #[test]
    fn columns_in_any_order() {
        let rows = parse(
            "\u{feff}steps,tokens,group,batch_size\n100,1e9,\"adam, w\",64\n50,,soap,128.0\n",
        )
        .unwrap();
        assert_eq!(
            rows[0],
            CbsRow {
                group: "adam, w".into(),
                batch_size: 64.0,
                steps: 100.0,
                n_params: None,
                tokens: Some(1e9),
            }
        );
        assert_eq!(rows[1].tokens, None);
        assert_eq!(rows[1].batch_size, 128.0);
    }

    #[test]
    fn errors_name_the_line() {
        assert!(err("").contains("empty"));
        assert!(err("group,batch_size,steps\n").contains("no data rows"));
        let m = err("group,steps\nx,1\n");
        assert!(
            m.contains("line 1") && m.contains("missing column(s) batch_size"),
            "{m}"
        );
        let m = err("group,batch_size,steps,loss\n");
        assert!(m.contains("unknown column `loss`"), "{m}");
        assert!(err("group,group,batch_size,steps\n").contains("appears twice"));
        let m = err("group,batch_size,steps\na,64,100\n# c\nb,64\n");
        assert!(
            m.contains("t.csv: line 4") && m.contains("2 field(s)"),
            "{m}"
        );
        let m = err("group,batch_size,steps\na,64,abc\n");
        assert!(
            m.contains("line 2") && m.contains("`steps` is not a number: `abc`"),
            "{m}"
        );
        let m = err("group,batch_size,steps\na,-64,10\n");
        assert!(
            m.contains("line 2") && m.contains("group `a`") && m.contains("> 0"),
            "{m}"
        );
        let m = err("group,batch_size,steps,n_params\na,64,10,0\n");
        assert!(m.contains("`n_params` must be finite and > 0"), "{m}");
        assert!(err("group,batch_size,steps\n,64,10\n").contains("`group` is empty"));
        assert!(err("group,batch_size,steps\na,64,\n").contains("`steps` is empty"));
        assert!(err("group,batch_size,steps\na,64,inf\n").contains("finite"));
    }
}
