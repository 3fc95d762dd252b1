//! Validation of SpikeRecords requests before anything is sent to Spike (SPEC §4.2):
//! every failure is `INVALID_ARGUMENT` with a message naming the field.

use base64::Engine;
use prost_types::Timestamp;
use tonic::Status;

/// Largest upload Spike takes, measured after base64 encoding.
pub const MAX_ENCODED_UPLOAD: usize = 10 * 1024 * 1024;
pub const LAB_MIME_TYPES: [&str; 5] = [
    "application/pdf",
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
];

/// Bounds on `include_nutrition_fields`. Spike defines a few dozen keys, each a short
/// snake_case name; anything past these bounds is not a list of keys.
pub const MAX_NUTRITION_FIELDS: usize = 64;
pub const MAX_NUTRITION_FIELD_LEN: usize = 64;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Spike's rule for user ids: 1–128 characters of `[A-Za-z0-9._-]`.
pub fn validate_user_id(id: &str) -> Result<(), Status> {
    validate_id("application_user_id", id)
}

/// Record ids go into the URL path: the same safe alphabet as user ids (UUIDs fit).
pub fn validate_record_id(id: &str) -> Result<(), Status> {
    validate_id("record_id", id)
}

fn validate_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(is_id_char) {
        return Err(Status::invalid_argument(format!(
            "{field} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// `include_nutrition_fields`: at most [`MAX_NUTRITION_FIELDS`] keys, each 1 to
/// [`MAX_NUTRITION_FIELD_LEN`] characters of `[a-z0-9_]`. Empty is valid (Spike's default).
pub fn validate_nutrition_fields(keys: &[String]) -> Result<(), Status> {
    if keys.len() > MAX_NUTRITION_FIELDS {
        return Err(Status::invalid_argument(format!(
            "include_nutrition_fields has {} keys; at most {MAX_NUTRITION_FIELDS} are accepted",
            keys.len()
        )));
    }
    let is_key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    for (index, key) in keys.iter().enumerate() {
        if key.is_empty() || key.len() > MAX_NUTRITION_FIELD_LEN || !key.chars().all(is_key_char) {
            return Err(Status::invalid_argument(format!(
                "include_nutrition_fields[{index}] must be 1-{MAX_NUTRITION_FIELD_LEN} characters of a-z, 0-9 or '_'"
            )));
        }
    }
    Ok(())
}

/// Base64 of a non-empty upload whose encoding fits Spike's limit (checked before encoding).
pub fn encode_upload(field: &str, bytes: &[u8]) -> Result<String, Status> {
    if bytes.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    let encoded_len = bytes.len().div_ceil(3) * 4;
    if encoded_len > MAX_ENCODED_UPLOAD {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes, {encoded_len} once base64-encoded; Spike accepts at most {MAX_ENCODED_UPLOAD}",
            bytes.len()
        )));
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn validate_range(
    from: Option<Timestamp>,
    to: Option<Timestamp>,
) -> Result<(Timestamp, Timestamp), Status> {
    let from = from.ok_or_else(|| Status::invalid_argument("from_timestamp is required"))?;
    let to = to.ok_or_else(|| Status::invalid_argument("to_timestamp is required"))?;
    if (from.seconds, from.nanos) > (to.seconds, to.nanos) {
        return Err(Status::invalid_argument(
            "from_timestamp is after to_timestamp",
        ));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_spikes_rule() {
        for good in ["a", "User.1_x-2", &"x".repeat(128)] {
            assert!(validate_user_id(good).is_ok(), "{good}");
        }
        for bad in ["", &"x".repeat(129), "a b", "a/b", "ü", "a\n"] {
            assert!(validate_user_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uploads_are_bounded_after_encoding() {
        assert!(encode_upload("image", b"").is_err());
        assert_eq!(encode_upload("image", b"hi").unwrap(), "aGk=");
        let largest = MAX_ENCODED_UPLOAD / 4 * 3;
        assert!(encode_upload("image", &vec![0; largest]).is_ok());
        assert!(encode_upload("image", &vec![0; largest + 1]).is_err());
    }

    #[test]
    fn nutrition_field_keys_are_bounded_snake_case() {
        let keys = |list: &[&str]| list.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        assert!(validate_nutrition_fields(&[]).is_ok());
        let longest = "a".repeat(MAX_NUTRITION_FIELD_LEN);
        assert!(
            validate_nutrition_fields(&keys(&["energy_kcal", "vitamin_b12_mcg", &longest])).is_ok()
        );
        let too_long = "a".repeat(MAX_NUTRITION_FIELD_LEN + 1);
        for bad in [
            "",
            "Energy_kcal",
            "energy kcal",
            "energy-kcal",
            "ü",
            &too_long,
        ] {
            let status = validate_nutrition_fields(&keys(&["protein_g", bad])).unwrap_err();
            assert!(
                status.message().contains("include_nutrition_fields[1]"),
                "{bad:?}: {status:?}"
            );
        }
        let many = vec!["protein_g".to_owned(); MAX_NUTRITION_FIELDS + 1];
        let status = validate_nutrition_fields(&many).unwrap_err();
        assert!(status.message().contains("at most 64"), "{status:?}");
        assert!(validate_nutrition_fields(&many[1..]).is_ok());
    }

    #[test]
    fn ranges_must_be_given_and_ordered() {
        let t = |seconds| Some(Timestamp { seconds, nanos: 0 });
        assert!(validate_range(t(1), t(2)).is_ok());
        assert!(validate_range(t(2), t(2)).is_ok());
        assert!(validate_range(t(3), t(2)).is_err());
        assert!(validate_range(None, t(2)).is_err());
        assert!(validate_range(t(1), None).is_err());
    }
}
