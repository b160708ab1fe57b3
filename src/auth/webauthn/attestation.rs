//! Attestation policy for new keys: which vendor CAs are trusted to vouch for a key's model,
//! and which models (AAGUIDs) an account accepts.
//!
//! webauthn-rs verifies the attestation statement and its certificate chain against the CA list
//! (`AttestationCaList`); a key with no attestation or with self attestation cannot chain to any
//! CA and is refused by it. The AAGUID allow-list is checked here, on the AAGUID the verified
//! attestation vouched for, so one CA list serves every account's allow-list.

use std::path::PathBuf;

use webauthn_rs::prelude::WebauthnError;
use webauthn_rs::prelude::{AttestationCaList, AttestationMetadata, ParsedAttestation, Uuid};

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Reads the trusted authenticator CAs from PEM files (any number of certificates each).
/// The error names the file and what is wrong with it.
pub fn attestation_cas(paths: &[PathBuf]) -> Result<AttestationCaList, String> {
    let mut list = AttestationCaList::default();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut found = 0;
        let mut rest = text.as_str();
        while let Some(start) = rest.find(BEGIN) {
            let Some(len) = rest[start..].find(END) else {
                return Err(format!(
                    "{}: a certificate is not terminated by {END}",
                    path.display()
                ));
            };
            let block = &rest[start..start + len + END.len()];
            found += 1;
            let one = AttestationCaList::try_from(block.as_bytes()).map_err(|_| {
                format!(
                    "{}: certificate {found} is not a valid X.509 certificate",
                    path.display()
                )
            })?;
            list.union(&one);
            rest = &rest[start + len + END.len()..];
        }
        if found == 0 {
            return Err(format!(
                "{} holds no PEM certificate ({BEGIN} … {END})",
                path.display()
            ));
        }
    }
    Ok(list)
}

/// The model (AAGUID) a verified attestation vouches for, when its format carries one.
pub(super) fn attested_model(att: &ParsedAttestation) -> Option<Uuid> {
    match &att.metadata {
        AttestationMetadata::Packed { aaguid } | AttestationMetadata::Tpm { aaguid, .. } => {
            Some(*aaguid)
        }
        _ => None,
    }
}

/// Whether `model` may be registered under an allow-list (empty: any attested model).
pub(super) fn model_allowed(model: Option<Uuid>, allowed: &[Uuid]) -> bool {
    allowed.is_empty() || model.is_some_and(|m| allowed.contains(&m))
}

/// Whether a registration failed because the key's attestation could not be trusted (as
/// opposed to a broken or replayed answer).
pub(super) fn is_attestation_failure(e: &WebauthnError) -> bool {
    matches!(
        e,
        WebauthnError::AttestationNotVerifiable
            | WebauthnError::AttestationChainNotTrusted(_)
            | WebauthnError::AttestationCertificateTrustStoreEmpty
            | WebauthnError::AttestationLeafCertMissing
            | WebauthnError::AttestationUntrustedAaguid
            | WebauthnError::AttestationFormatMissingAaguid
            | WebauthnError::AttestationNotSupported
            | WebauthnError::AttestationTrustFailure
            | WebauthnError::AttestationCertificateRequirementsNotMet
            | WebauthnError::CredentialMayNotBeHardwareBound
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_need_the_attested_model() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert!(model_allowed(None, &[]));
        assert!(model_allowed(Some(a), &[a, b]));
        assert!(!model_allowed(Some(a), &[b]));
        assert!(!model_allowed(None, &[a]));
    }

    #[test]
    fn ca_files_are_checked() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-ca-{}", crate::crypto::random_token(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = attestation_cas(&[missing]).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = attestation_cas(&[empty]).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, format!("{BEGIN}\nAAAA\n{END}\n")).unwrap();
        let e = attestation_cas(&[bad]).unwrap_err();
        assert!(e.contains("certificate 1 is not a valid"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
