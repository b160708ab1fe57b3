use std::sync::Arc;

use super::*;
use crate::clock::ManualClock;
use crate::store::memory::MemoryStore;

const H: i64 = 3_600_000;

fn geo_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-test.mmdb")
}

fn engine(geo: bool) -> Risk {
    let clock = Arc::new(ManualClock::starting_now());
    let config = RiskConfig {
        geoip_database: geo.then(geo_path),
        ..RiskConfig::default()
    };
    Risk::new(config, Arc::new(MemoryStore::new(clock))).unwrap()
}

fn names(a: &Assessment) -> Vec<&'static str> {
    a.signals.iter().map(Signal::name).collect()
}

#[test]
fn places_come_from_the_database() {
    let r = engine(true);
    let berlin = r.place("127.0.1.9").unwrap();
    assert_eq!(berlin.country.as_deref(), Some("DE"));
    assert_eq!(berlin.city.as_deref(), Some("Berlin"));
    assert_eq!(berlin.at, Some((525_200, 134_050)));
    assert_eq!(berlin.describe(), "Berlin, DE");
    // IPv4-mapped IPv6 reads as the IPv4 address; IPv6 networks are looked up too.
    assert_eq!(
        r.place("::ffff:127.0.2.1").unwrap().city.as_deref(),
        Some("Sydney")
    );
    assert_eq!(
        r.place("2001:db8::5").unwrap().country.as_deref(),
        Some("JP")
    );
    // Known by country only; unknown; not an address.
    let nl = r.place("127.0.5.1").unwrap();
    assert_eq!((nl.country.as_deref(), nl.at), (Some("NL"), None));
    assert_eq!(r.place("127.0.9.1"), None);
    assert_eq!(r.place("not an address"), None);
    // Without a database nothing is known.
    assert_eq!(engine(false).place("127.0.1.9"), None);
}

#[test]
fn databases_that_say_nothing_of_places_are_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::new(clock));
    let asn = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-asn-test.mmdb");
    let e = Risk::new(
        RiskConfig {
            geoip_database: Some(asn),
            ..RiskConfig::default()
        },
        store.clone(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("City or Country"), "{e}");
    let e = Risk::new(
        RiskConfig {
            geoip_database: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")),
            ..RiskConfig::default()
        },
        store,
    )
    .unwrap_err();
    assert!(e.to_string().contains("Cargo.toml"), "{e}");
}

#[test]
fn distances_are_great_circles() {
    let frankfurt = (501_109, 86_821);
    let sydney = (-338_688, 1_512_093);
    let d = distance_km(frankfurt, sydney);
    assert!((16_400.0..16_600.0).contains(&d), "{d}");
    assert!(distance_km(frankfurt, frankfurt) < 0.001);
    // Across the antimeridian: a short hop, not a trip round the world.
    let d = distance_km((0, 1_799_000), (0, -1_799_000));
    assert!(d < 30.0, "{d}");
}

#[tokio::test]
async fn sign_ins_score_what_the_account_has_not_done_before() {
    let r = engine(true);
    let t0 = 1_700_000_000_000;
    // The first sign-in has no history to differ from: only the new browser counts.
    let a = r
        .assess_sign_in("u1", "127.0.0.7", false, t0)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device"]);
    assert_eq!((a.score, a.level), (25, Level::Low));
    // Nothing is learnt before a sign-in completes.
    let again = r.assess_sign_in("u1", "127.0.2.7", true, t0).await.unwrap();
    assert!(again.signals.is_empty(), "{again:?}");
    let frankfurt = r.place("127.0.0.7");
    r.record_sign_in("u1", "127.0.0.7", frankfurt.as_ref(), t0)
        .await
        .unwrap();

    // The same network and device: nothing.
    let a = r
        .assess_sign_in("u1", "127.0.0.99", true, t0 + H)
        .await
        .unwrap();
    assert_eq!((a.score, a.level), (0, Level::Low));
    // Berlin, an hour later: another network in the same country, close enough to drive.
    let a = r
        .assess_sign_in("u1", "127.0.1.7", true, t0 + H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_network"]);
    assert_eq!(a.level, Level::Low);
    // Paris, by train: a new network and a new country.
    let a = r
        .assess_sign_in("u1", "127.0.3.7", true, t0 + 5 * H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_network", "new_country"]);
    assert_eq!((a.score, a.level), (45, Level::Medium));
    // Sydney two hours after Frankfurt: impossible, from a new browser — high.
    let a = r
        .assess_sign_in("u1", "127.0.2.7", false, t0 + 2 * H)
        .await
        .unwrap();
    assert_eq!(
        names(&a),
        [
            "new_device",
            "new_network",
            "new_country",
            "impossible_travel"
        ]
    );
    assert_eq!((a.score, a.level), (130, Level::High));
    let Signal::ImpossibleTravel { km, minutes, from } = &a.signals[3] else {
        panic!("{a:?}");
    };
    assert!((16_000..17_000).contains(km), "{km}");
    assert_eq!(
        (*minutes, from.describe().as_str()),
        (120, "Frankfurt am Main, DE")
    );
    assert_eq!(
        a.summary(),
        "score 130: new_device, new_network, new_country, impossible_travel (Sydney, AU)"
    );
    // The same trip after a day is a flight, not a sign of theft.
    let a = r
        .assess_sign_in("u1", "127.0.2.7", true, t0 + 24 * H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_network", "new_country"]);
    // Histories are per account.
    let other = r
        .assess_sign_in("u2", "127.0.2.7", true, t0 + H)
        .await
        .unwrap();
    assert!(other.signals.is_empty(), "{other:?}");
}

#[tokio::test]
async fn sign_ins_teach_the_history_and_it_forgets() {
    let r = engine(true);
    let t0 = 1_700_000_000_000;
    for (ip, t) in [("127.0.0.1", t0), ("127.0.2.1", t0 + 48 * H)] {
        let p = r.place(ip);
        r.record_sign_in("u1", ip, p.as_ref(), t).await.unwrap();
    }
    // Both places are familiar now; the last place is Sydney.
    let a = r
        .assess_sign_in("u1", "127.0.0.1", true, t0 + 49 * H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["impossible_travel"], "{a:?}");
    let a = r
        .assess_sign_in("u1", "127.0.2.1", true, t0 + 49 * H)
        .await
        .unwrap();
    assert!(a.signals.is_empty(), "{a:?}");
    // A country-only place teaches the country, and keeps the last located place.
    let nl = r.place("127.0.5.1");
    r.record_sign_in("u1", "127.0.5.1", nl.as_ref(), t0 + 50 * H)
        .await
        .unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.0.1", true, t0 + 51 * H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["impossible_travel"], "{a:?}");
    // Only the most recent networks are kept.
    for i in 0..=HISTORY_LEN {
        let ip = format!("10.0.{i}.1");
        r.record_sign_in("u3", &ip, None, t0 + i as i64)
            .await
            .unwrap();
    }
    let oldest = r
        .assess_sign_in("u3", "10.0.0.1", true, t0 + H)
        .await
        .unwrap();
    assert_eq!(names(&oldest), ["new_network"]);
    let newest = r
        .assess_sign_in("u3", "10.0.20.1", true, t0 + H)
        .await
        .unwrap();
    assert!(newest.signals.is_empty());
}

#[tokio::test]
async fn without_a_database_only_devices_and_networks_count() {
    let r = engine(false);
    let t0 = 1_700_000_000_000;
    r.record_sign_in("u1", "127.0.0.1", None, t0).await.unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.2.1", false, t0 + H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device", "new_network"]);
    assert_eq!((a.score, a.level, a.place), (40, Level::Medium, None));
}

#[test]
fn moves_are_held_when_nobody_could_travel_that_fast() {
    let r = engine(true);
    let t0 = 1_700_000_000_000;
    let frankfurt = Fix {
        place: r.place("127.0.0.1").unwrap(),
        at_ms: t0,
    };
    // Same place: the fix is kept (renewed by the caller), nothing risky.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.0.200", t0 + 60_000);
    assert_eq!(fix.unwrap().place, frankfurt.place);
    assert!(risky.is_none());
    // Paris is within `min_travel_distance`: never travel, however fast.
    let (_, risky) = r.assess_move(Some(&frankfurt), "127.0.3.1", t0 + 60_000);
    assert!(risky.is_none());
    // Sydney ten minutes later: held.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.2.1", t0 + 600_000);
    assert_eq!(fix.unwrap().place.city.as_deref(), Some("Sydney"));
    let risky = risky.unwrap();
    assert_eq!(names(&risky), ["impossible_travel"]);
    assert_eq!(risky.level, Level::High);
    // New York a day later: a flight.
    let (_, risky) = r.assess_move(Some(&frankfurt), "127.0.4.1", t0 + 24 * H);
    assert!(risky.is_none());
    // An address the database does not know keeps the last fix.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.9.1", t0 + 600_000);
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    assert!(risky.is_none());
    // No fix yet: the first one is taken.
    let (fix, risky) = r.assess_move(None, "127.0.2.1", t0);
    assert!(fix.is_some() && risky.is_none());
}

#[test]
fn scores_follow_the_configured_levels() {
    let clock = Arc::new(ManualClock::starting_now());
    let r = Risk::new(
        RiskConfig {
            medium_score: 10,
            high_score: 40,
            ..RiskConfig::default()
        },
        Arc::new(MemoryStore::new(clock)),
    )
    .unwrap();
    assert_eq!(r.level(9), Level::Low);
    assert_eq!(r.level(10), Level::Medium);
    assert_eq!(r.level(40), Level::High);
}

#[tokio::test]
async fn the_owner_is_mailed_once_an_hour_per_kind() {
    let r = engine(false);
    assert!(r.may_notify("u1", "sign_in").await.unwrap());
    assert!(!r.may_notify("u1", "sign_in").await.unwrap());
    assert!(r.may_notify("u1", "session").await.unwrap());
    assert!(r.may_notify("u2", "sign_in").await.unwrap());
}
