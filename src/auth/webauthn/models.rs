//! Names of well-known authenticators by AAGUID (the model id an authenticator reports when it
//! registers), from the community list of passkey providers
//! (passkeydeveloper/passkey-authenticator-aaguids). Shown next to the AAGUID on the account
//! page and in the admin console; unknown models show the AAGUID alone.

const KNOWN: &[(&str, &str)] = &[
    (
        "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4",
        "Google Password Manager",
    ),
    ("adce0002-35bc-c60a-648b-0b25f1f05503", "Chrome on Mac"),
    ("771b48fd-d3d4-4f74-9232-fc157ab0507a", "Edge on Mac"),
    ("fbfc3007-154e-4ecc-8c0b-6e020557d7bd", "iCloud Keychain"),
    (
        "dd4ec289-e01d-41c9-bb89-70fa845d4bf2",
        "iCloud Keychain (managed)",
    ),
    ("08987058-cadc-4b81-b6e1-30de50dcbe96", "Windows Hello"),
    ("9ddd1817-af5a-4672-a2b9-3e3dd95000a9", "Windows Hello"),
    ("6028b017-b1d4-4c02-b4b3-afcdafc96bb2", "Windows Hello"),
    ("bada5566-a7aa-401f-bd96-45619a55120d", "1Password"),
    ("d548826e-79b4-db40-a3d8-11116f7e8349", "Bitwarden"),
    ("53414d53-554e-4700-0000-000000000000", "Samsung Pass"),
];

/// The model's name, when it is a well-known one.
pub fn name_of(aaguid: &str) -> Option<&'static str> {
    let aaguid = aaguid.trim().to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|(id, _)| *id == aaguid)
        .map(|(_, name)| *name)
}

/// How a key's model is shown: its name and AAGUID, the AAGUID alone, or "not reported".
pub fn describe(aaguid: Option<&str>) -> String {
    match aaguid {
        None => "not reported".into(),
        Some(id) => match name_of(id) {
            Some(name) => format!("{name} ({id})"),
            None => id.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_are_named_and_unknown_ones_shown_as_is() {
        assert_eq!(
            describe(Some("EA9B8D66-4D01-1D21-3CE4-B6B48CB575D4")),
            "Google Password Manager (EA9B8D66-4D01-1D21-3CE4-B6B48CB575D4)"
        );
        assert_eq!(
            describe(Some("00000000-0000-0000-0000-000000000001")),
            "00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(describe(None), "not reported");
        assert!(KNOWN
            .iter()
            .all(|(id, _)| uuid::Uuid::parse_str(id).is_ok()));
    }
}
