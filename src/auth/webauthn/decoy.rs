//! Made-up keys for sign-ins whose second factor comes first.
//!
//! After 100 consecutive wrong passwords an account asks for its second factor before the
//! password, and an address without an account does the same (a decoy). If only accounts with a
//! security key then offered a key ceremony, naming their credential ids, the ceremony would tell
//! a guesser which addresses have an account with a key. So every such sign-in offers one: an
//! account without a usable key (and a decoy) gets credential ids made up by webauthn-rs's fake
//! credential generator (lengths and counts drawn like real authenticators'), seeded by a keyed
//! hash of the sign-in's user id, so that every attempt and every gateway names the same ids.
//! No answer can match them: no stored key has them, so an answer is refused as a wrong key.

use webauthn_rs::fake::{FakePasskeyDistribution, WebauthnFakeCredentialGenerator};
use webauthn_rs::prelude::{
    COSEAlgorithm, COSEEC2Key, COSEKey, COSEKeyType, CredentialID, ECDSACurve, Passkey,
};

use super::{internal, Keys};
use crate::auth::flow::FlowError;

/// A point on P-256 (its generator) as the made-up keys' public key: a ceremony's options name
/// only credential ids, and no answer gets as far as a signature check against it.
const POINT_X: [u8; 32] = [
    0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40, 0xf2,
    0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2, 0x96,
];
const POINT_Y: [u8; 32] = [
    0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16,
    0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5,
];

/// How many seeds are tried for a non-empty set of ids (the generator gives none for about one
/// seed in seven, where a real account with a key always has one).
const SEEDS: u8 = 16;

impl Keys {
    /// One to three made-up keys for `user_id`, the same every time (see the module docs).
    pub(super) fn made_up_keys(&self, user_id: &str) -> Result<Vec<Passkey>, FlowError> {
        let secret = self
            .flow
            .master_key
            .link_mac(b"portcullis/made-up-credential-ids/v1");
        let generator = WebauthnFakeCredentialGenerator::<FakePasskeyDistribution>::new(&secret)
            .map_err(internal)?;
        for seed in 0..SEEDS {
            let ids = generator
                .generate(format!("{user_id}\0{seed}").as_bytes())
                .map_err(internal)?;
            if !ids.is_empty() {
                return ids.iter().map(made_up_passkey).collect();
            }
        }
        // Not reached in practice (one in 7^16); one id of a common length all the same.
        let id: Vec<u8> = self
            .flow
            .master_key
            .link_mac(format!("portcullis/made-up-credential-id/v1\0{user_id}").as_bytes())[..20]
            .to_vec();
        Ok(vec![made_up_passkey(&id.into())?])
    }
}

/// A passkey record with the credential id `id`, in webauthn-rs's own stored form.
fn made_up_passkey(id: &CredentialID) -> Result<Passkey, FlowError> {
    let key = COSEKey {
        type_: COSEAlgorithm::ES256,
        key: COSEKeyType::EC_EC2(COSEEC2Key {
            curve: ECDSACurve::SECP256R1,
            x: POINT_X.to_vec().into(),
            y: POINT_Y.to_vec().into(),
        }),
    };
    let record = serde_json::json!({
        "cred": {
            "cred_id": id,
            "cred": key,
            "counter": 0,
            "transports": null,
            "user_verified": false,
            "backup_eligible": false,
            "backup_state": false,
            "registration_policy": "preferred",
            "extensions": {},
            "attestation": { "data": "None", "metadata": "None" },
            "attestation_format": "none",
        }
    });
    serde_json::from_value(record).map_err(internal)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_made_up_passkey_has_the_id_it_was_given() {
        let id: CredentialID = vec![7u8; 65].into();
        let pk = made_up_passkey(&id).unwrap();
        assert_eq!(pk.cred_id(), &id);
    }
}
