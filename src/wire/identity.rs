//! Event identity (SPEC §2.4): an item's id is its category prefix and a hash of its whole
//! content in a canonical form, so any difference makes another event and the same item
//! again (re-formatted, re-batched) the same one.
//!
//! The canonical form of a [`Json`] tree:
//! - objects: members sorted by the UTF-8 bytes of their decoded keys (code point order;
//!   not the UTF-16 code units RFC 8785 uses), one member per key (the last one sent), as
//!   `{"k":v,...}` without whitespace;
//! - arrays: `[v,...]` in their order;
//! - strings: their decoded value between quotes, `"` and `\` escaped with a backslash,
//!   control characters as `\u00xx`, every other character as itself; a lone surrogate as
//!   `\udxxx` (lower-case), which no other string produces;
//! - numbers by exact decimal value, whatever their magnitude: `-`, the significant digits
//!   without leading or trailing zeros, then `e` and the power of ten unless it is 0 (`150`,
//!   `150.0`, `1.5e2` → `15e1`; `0.25` → `25e-2`; every zero → `0`);
//! - `true`, `false`, `null`.
//!
//! The id is `main-`, `lab-` or `nutrition-` followed by the hex of the first 128 bits of
//! SHA-256 over that form.

use sha2::{Digest, Sha256};

use super::json::{Json, write_string};

/// `prefix-` + hex of the first 128 bits of SHA-256 over the canonical form of `item`.
pub fn event_id(prefix: &str, item: &Json<'_>) -> String {
    let digest = Sha256::digest(canonical(item).as_bytes());
    prefixed_hex(prefix, &digest[..16])
}

/// `prefix-` followed by the lower-case hex of `bytes`, built in one allocation (`format!`
/// over `hex::encode` collected the hex a `char` at a time into a second `String`).
pub(super) fn prefixed_hex(prefix: &str, bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(prefix.len() + 1 + 2 * bytes.len());
    id.push_str(prefix);
    id.push('-');
    for byte in bytes {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

/// The canonical form of `value` (see the module documentation).
pub fn canonical(value: &Json<'_>) -> String {
    // Sized for a typical Spike item (a few hundred bytes), so building the form rarely
    // reallocates: growth from empty cost several reallocations per item in profiles.
    let mut out = String::with_capacity(1024);
    write(value, Numbers::ByValue, &mut out);
    out
}

/// `value` in the canonical layout but with numbers as sent: for showing JSON as text.
pub fn compact(value: &Json<'_>) -> String {
    let mut out = String::new();
    write(value, Numbers::AsSent, &mut out);
    out
}

#[derive(Clone, Copy)]
enum Numbers {
    ByValue,
    AsSent,
}

fn write(value: &Json<'_>, numbers: Numbers, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(literal) => match numbers {
            Numbers::ByValue => write_number(literal, out),
            Numbers::AsSent => out.push_str(literal),
        },
        Json::String(text) => write_string(text, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, numbers, out);
            }
            out.push(']');
        }
        Json::Object(object) => {
            out.push('{');
            for (i, (key, value)) in object.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write(value, numbers, out);
            }
            out.push('}');
        }
    }
}

/// Writes a JSON number literal (already checked against the grammar) by its exact value.
fn write_number(literal: &str, out: &mut String) {
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (mantissa, exponent) = unsigned.split_once(['e', 'E']).unwrap_or((unsigned, "0"));
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = int.bytes().chain(frac.bytes());
    let total = int.len() + frac.len();
    let leading = digits.clone().take_while(|&d| d == b'0').count();
    if leading == total {
        out.push('0');
        return;
    }
    let trailing = digits.clone().rev().take_while(|&d| d == b'0').count();
    if negative {
        out.push('-');
    }
    out.extend(
        digits
            .skip(leading)
            .take(total - leading - trailing)
            .map(char::from),
    );
    // value = significant digits × 10^(exponent + trailing − frac.len()); the adjustment
    // is bounded by the literal's length, the exponent is not.
    let adjustment = trailing as i128 - frac.len() as i128;
    let power = add_to_decimal(exponent, adjustment);
    if power != "0" {
        out.push('e');
        out.push_str(&power);
    }
}

/// `decimal` (an optionally signed run of digits, any length) plus `n`, exactly, as
/// decimal text without leading zeros.
fn add_to_decimal(decimal: &str, n: i128) -> String {
    let (negative, digits) = match decimal.as_bytes().first() {
        Some(b'-') => (true, &decimal[1..]),
        Some(b'+') => (false, &decimal[1..]),
        _ => (false, decimal),
    };
    let digits = digits.trim_start_matches('0');
    // Up to 36 digits fit an i128 with room for `n`, which is bounded by an input length.
    if digits.len() <= 36 {
        let magnitude: i128 = digits.parse().unwrap_or(0);
        let value = if negative { -magnitude } else { magnitude };
        return (value + n).to_string();
    }
    // |decimal| ≥ 10^36 > |n|: the sign stays that of `decimal`, only the magnitude moves.
    let grows = (n >= 0) != negative;
    let mut result: Vec<u8> = digits.bytes().map(|d| d - b'0').collect();
    let mut carry = n.unsigned_abs();
    for digit in result.iter_mut().rev() {
        if carry == 0 {
            break;
        }
        let d = u128::from(*digit);
        let step = carry % 10;
        carry /= 10;
        if grows {
            let sum = d + step;
            *digit = (sum % 10) as u8;
            carry += sum / 10;
        } else if d >= step {
            *digit = (d - step) as u8;
        } else {
            *digit = (d + 10 - step) as u8;
            carry += 1;
        }
    }
    let mut text = String::with_capacity(result.len() + 2);
    if negative {
        text.push('-');
    }
    // Addition may carry past the first digit; subtraction may leave leading zeros.
    let significant = if carry > 0 {
        text.push_str(&carry.to_string());
        0
    } else {
        result.iter().position(|&d| d != 0).unwrap_or(result.len())
    };
    text.extend(result[significant..].iter().map(|&d| char::from(b'0' + d)));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json::parse;

    #[test]
    fn ids_are_the_prefix_and_the_hex_format_and_hex_crate_agree_on() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(
            prefixed_hex("main", &bytes),
            format!("main-{}", hex::encode(&bytes))
        );
        assert_eq!(prefixed_hex("lab", &[]), "lab-");
    }

    fn canon(json: &str) -> String {
        canonical(&parse(json, 8).unwrap())
    }

    #[test]
    fn numbers_are_compared_by_exact_value() {
        for same in [
            "150",
            "150.0",
            "1.5e2",
            "15E1",
            "0.015e4",
            "1500e-1",
            "150.000e0",
        ] {
            assert_eq!(canon(same), "15e1", "{same}");
        }
        assert_eq!(canon("0.25"), "25e-2");
        assert_eq!(canon("-7"), "-7");
        for zero in ["0", "-0", "0.000", "0e99"] {
            assert_eq!(canon(zero), "0", "{zero}");
        }
        assert_eq!(canon("1e400"), "1e400");
        assert_eq!(canon("10e399"), "1e400");
        assert_ne!(canon("1e400"), canon("1e401"));
        assert_ne!(
            canon("1.0000000000000001"),
            canon("1"),
            "beyond f64 precision"
        );
        let huge = format!("1e{}", "9".repeat(50));
        assert_eq!(
            canon(&format!("10e{}", "9".repeat(50))),
            format!("1e1{}", "0".repeat(50))
        );
        assert_eq!(
            canon(&format!("0.1e-{}", "9".repeat(50))),
            format!("1e-1{}", "0".repeat(50))
        );
        assert_eq!(canon(&huge), huge);
        // Either side of the switch from i128 to digit-by-digit arithmetic.
        for nines in [35, 36, 37, 38] {
            let exponent = "9".repeat(nines);
            let ten = format!("1e1{}", "0".repeat(nines));
            assert_eq!(canon(&format!("10e{exponent}")), ten, "{nines}");
            assert_eq!(
                canon(&format!("0.1e-{exponent}")),
                format!("1e-1{}", "0".repeat(nines))
            );
            assert_eq!(
                canon(&format!("0.01e1{}", "0".repeat(nines))),
                format!("1e{}8", "9".repeat(nines - 1))
            );
        }
        assert_eq!(
            canon(&format!("1e-{}0", "1".repeat(40))),
            format!("1e-{}0", "1".repeat(40))
        );
        assert_eq!(
            canon(&format!("0.01e1{}", "0".repeat(40))),
            format!("1e{}8", "9".repeat(39))
        );
    }

    #[test]
    fn whitespace_key_order_and_escapes_do_not_matter() {
        let a = canon(r#"{ "b" : [1, {"d":null,"c":true}], "a":"\u0041\/" }"#);
        assert_eq!(a, r#"{"a":"A/","b":[1,{"c":true,"d":null}]}"#);
        assert_eq!(
            canon("\"tab\\there \\\"q\\\" \\\\ \u{e9}\""),
            r#""tab\u0009here \"q\" \\ é""#
        );
    }

    #[test]
    fn keys_sort_by_utf8_bytes() {
        // UTF-16 code units would put U+1F600 (a surrogate pair, 0xD83D…) before U+FF61.
        assert_eq!(canon(r#"{"😀":1,"｡":2,"z":3}"#), r#"{"z":3,"｡":2,"😀":1}"#);
    }

    #[test]
    fn the_last_duplicate_wins_and_lone_surrogates_stay_distinct() {
        assert_eq!(canon(r#"{"a":1,"a":2}"#), canon(r#"{"a":2}"#));
        assert_eq!(canon(r#""\ud800x""#), r#""\ud800x""#);
        assert_ne!(canon(r#""\ud800""#), canon(r#""\ufffd""#));
        assert_ne!(canon(r#""\ud800""#), canon(r#""\ud801""#));
        assert_eq!(canon(r#"{"\ud800":1,"\ufffd":2}"#), r#"{"�":2,"\ud800":1}"#);
    }

    #[test]
    fn ids_carry_the_prefix_and_128_bits() {
        let id = event_id("lab", &parse("{}", 1).unwrap());
        assert_eq!(
            id,
            format!("lab-{}", &hex::encode(Sha256::digest(b"{}"))[..32])
        );
    }
}
