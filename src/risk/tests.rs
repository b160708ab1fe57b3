use std::sync::Arc;

use super::*;
use crate::clock::ManualClock;
use crate::store::memory::MemoryStore;

const H: i64 = 3_600_000;

fn geo_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-test.mmdb")
}

/// A risk engine over a fresh SQLite database (kept while the directory lives).
struct Engine {
    risk: Risk,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Engine {
    type Target = Risk;
    fn deref(&self) -> &Risk {
        &self.risk
    }
}

/// A risk engine over the SQLite database in `dir` (created on first use).
async fn risk_in(dir: &Path, config: RiskConfig) -> Result<Risk, GeoError> {
    let url = format!("sqlite://{}", dir.join("risk.sqlite").display());
    let durable = crate::store::sql::SqlStore::connect(&url).await.unwrap();
    durable.migrate().await.unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    Risk::new(config, Arc::new(durable), Arc::new(MemoryStore::new(clock)))
}

async fn engine_with(config: RiskConfig) -> Result<Engine, GeoError> {
    let dir = tempfile::tempdir().unwrap();
    let risk = risk_in(dir.path(), config).await?;
    Ok(Engine { risk, _dir: dir })
}

async fn engine(geo: bool) -> Engine {
    engine_with(RiskConfig {
        geoip_database: geo.then(geo_path),
        ..RiskConfig::default()
    })
    .await
    .unwrap()
}

fn names(a: &Assessment) -> Vec<&'static str> {
    a.signals.iter().map(Signal::name).collect()
}

#[tokio::test]
async fn places_come_from_the_database() {
    let r = engine(true).await;
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
    assert_eq!(engine(false).await.place("127.0.1.9"), None);
}

#[tokio::test]
async fn databases_that_say_nothing_of_places_are_refused() {
    let with = |p: PathBuf| {
        engine_with(RiskConfig {
            geoip_database: Some(p),
            ..RiskConfig::default()
        })
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let e = with(data.join("geoip-asn-test.mmdb")).await.err().unwrap();
    assert!(e.to_string().contains("City, Country"), "{e}");
    let e = with(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("Cargo.toml"), "{e}");
    // Metadata intact, search tree damaged: refused when opened, not at every lookup after.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(data.join("geoip-test.mmdb")).unwrap();
    for b in bytes.iter_mut().take(600) {
        *b ^= 0x5a;
    }
    let damaged = dir.path().join("damaged.mmdb");
    std::fs::write(&damaged, bytes).unwrap();
    let e = with(damaged).await.err().unwrap();
    assert!(e.to_string().contains("damaged"), "{e}");
}

#[tokio::test]
async fn distances_are_great_circles() {
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
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    // The first sign-in has no history to differ from: a new browser on a network as new as
    // any, but no country or place to compare.
    let a = r
        .assess_sign_in("u1", "127.0.0.7", false, t0)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device", "new_network"]);
    assert_eq!((a.score, a.level), (40, Level::Medium));
    // Nothing is learnt before a sign-in completes.
    let again = r.assess_sign_in("u1", "127.0.2.7", true, t0).await.unwrap();
    assert_eq!(names(&again), ["new_network"]);
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
    assert_eq!(names(&other), ["new_network"]);
}

#[tokio::test]
async fn sign_ins_teach_the_history_up_to_its_length() {
    let r = engine(true).await;
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
    let r = engine(false).await;
    let t0 = 1_700_000_000_000;
    r.record_sign_in("u1", "127.0.0.1", None, t0).await.unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.2.1", false, t0 + H)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device", "new_network"]);
    assert_eq!((a.score, a.level, a.place), (40, Level::Medium, None));
}

#[tokio::test]
async fn moves_are_held_when_nobody_could_travel_that_fast() {
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    let frankfurt = r.fix_at("127.0.0.1", t0).unwrap();
    // Same place: the fix stands (renewed at most every five minutes), nothing risky.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.0.200", t0 + 60_000);
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    assert!(risky.is_none());
    let (fix, _) = r.assess_move(Some(&frankfurt), "127.0.0.200", t0 + FIX_RENEWAL_MS);
    assert_eq!(fix.unwrap().at_ms, t0 + FIX_RENEWAL_MS);
    // Paris is within `min_travel_distance`: never travel, however fast.
    let (_, risky) = r.assess_move(Some(&frankfurt), "127.0.3.1", t0 + 60_000);
    assert!(risky.is_none());
    // Sydney ten minutes later: held, and the fix stays where the session was.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.2.1", t0 + 600_000);
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    let risky = risky.unwrap();
    assert_eq!(names(&risky), ["impossible_travel"]);
    assert_eq!(risky.level, Level::High);
    assert_eq!(risky.place.unwrap().city.as_deref(), Some("Sydney"));
    // New York a day later: a flight, and the fix moves there.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.4.1", t0 + 24 * H);
    assert!(risky.is_none());
    assert_eq!(fix.unwrap().place.city.as_deref(), Some("New York"));
    // An address the database does not know keeps the last fix.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.9.1", t0 + 600_000);
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    assert!(risky.is_none());
    // No fix yet: the first one is taken.
    let (fix, risky) = r.assess_move(None, "127.0.2.1", t0);
    assert!(fix.is_some() && risky.is_none());
}

#[tokio::test]
async fn a_fix_is_not_carried_away_by_detours_or_short_hops() {
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    let frankfurt = r.fix_at("127.0.0.1", t0).unwrap();
    // A detour through an address known by its country only keeps Frankfurt, so Sydney right
    // after is still impossible.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.5.1", t0 + 1_000);
    assert!(risky.is_none());
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    let (_, risky) = r.assess_move(fix.as_ref(), "127.0.2.1", t0 + 2_000);
    assert!(risky.is_some());
    // Hops too short to count (Frankfurt → Paris, 480 km) but made in a second keep the fix in
    // Frankfurt; the next hop (Nantes, 800 km from Frankfurt) is then measured from there.
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.3.1", t0 + 1_000);
    assert!(risky.is_none());
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    let (_, risky) = r.assess_move(fix.as_ref(), "127.0.6.1", t0 + 2_000);
    assert_eq!(names(&risky.unwrap()), ["impossible_travel"]);
    // Made at a pace anyone could travel, the same hops move the fix along.
    let (fix, _) = r.assess_move(Some(&frankfurt), "127.0.3.1", t0 + H);
    assert_eq!(fix.as_ref().unwrap().place.city.as_deref(), Some("Paris"));
    let (_, risky) = r.assess_move(fix.as_ref(), "127.0.6.1", t0 + H + 1_000);
    assert!(risky.is_none());
}

#[tokio::test]
async fn coarse_places_count_only_what_they_are_sure_of() {
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    let coarse = r.place("127.0.7.1").unwrap();
    assert_eq!(
        (coarse.country.as_deref(), coarse.radius_km),
        (Some("PL"), Some(1000))
    );
    // 900 km from Frankfurt by its coordinates, but within 1000 km of them: not travel. Nor is
    // the session placed there, or Moscow (1,150 km from those coordinates) would look
    // reachable from it; measured from Frankfurt, Moscow a second later is impossible.
    let frankfurt = r.fix_at("127.0.0.1", t0).unwrap();
    let (fix, risky) = r.assess_move(Some(&frankfurt), "127.0.7.1", t0 + 1_000);
    assert!(risky.is_none());
    assert_eq!(fix.as_ref(), Some(&frankfurt));
    let (_, risky) = r.assess_move(fix.as_ref(), "127.0.8.1", t0 + 2_000);
    assert_eq!(names(&risky.unwrap()), ["impossible_travel"]);
    // A coarse place is no session's first place, nor an account's last one.
    assert_eq!(r.fix_at("127.0.7.1", t0), None);
    assert_eq!(r.assess_move(None, "127.0.7.1", t0).0, None);
    let last = r
        .record_sign_in("u1", "127.0.0.1", r.place("127.0.0.1").as_ref(), t0)
        .await
        .unwrap();
    assert_eq!(
        last.as_ref().map(|f| f.place.city.as_deref()),
        Some(Some("Frankfurt am Main"))
    );
    let last = r
        .record_sign_in("u1", "127.0.7.1", Some(&coarse), t0 + 60_000)
        .await
        .unwrap();
    assert_eq!(
        last.unwrap().place.city.as_deref(),
        Some("Frankfurt am Main")
    );
    let a = r
        .assess_sign_in("u1", "127.0.8.1", true, t0 + 120_000)
        .await
        .unwrap();
    assert!(names(&a).contains(&"impossible_travel"), "{a:?}");
}

#[tokio::test]
async fn scores_follow_the_configured_levels() {
    let r = engine_with(RiskConfig {
        medium_score: 10,
        high_score: 40,
        ..RiskConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(r.level(9), Level::Low);
    assert_eq!(r.level(10), Level::Medium);
    assert_eq!(r.level(40), Level::High);
}

#[tokio::test]
async fn the_owner_is_mailed_once_an_hour_per_kind() {
    let r = engine(false).await;
    assert!(r.may_notify("u1", "sign_in").await.unwrap());
    assert!(!r.may_notify("u1", "sign_in").await.unwrap());
    assert!(r.may_notify("u1", "session").await.unwrap());
    assert!(r.may_notify("u2", "sign_in").await.unwrap());
}

#[tokio::test]
async fn old_entries_are_forgotten_and_reported_sign_ins_taken_out() {
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    let day = 24 * H;
    for (ip, t) in [("127.0.3.1", t0), ("127.0.0.1", t0 + 80 * day)] {
        let p = r.place(ip);
        r.record_sign_in("u1", ip, p.as_ref(), t).await.unwrap();
    }
    // Paris (day 0) is still familiar on day 85; on day 95 it is past `risk.history` (90 days),
    // though the account signed in within every 90 days.
    let a = r
        .assess_sign_in("u1", "127.0.3.9", true, t0 + 85 * day)
        .await
        .unwrap();
    assert!(a.signals.is_empty(), "{a:?}");
    let a = r
        .assess_sign_in("u1", "127.0.3.9", true, t0 + 95 * day)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_network", "new_country"]);

    // A thief's sign-in from Sydney, reported by the owner: Sydney is new again, and the
    // owner's next sign-in at home is not measured from Sydney.
    let t1 = t0 + 81 * day;
    let p = r.place("127.0.2.1");
    r.record_sign_in("u1", "127.0.2.1", p.as_ref(), t1)
        .await
        .unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.2.50", false, t1 + 60_000)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device"]);
    r.forget_sign_in("u1", "127.0.2.1", t1 + 60_000)
        .await
        .unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.2.50", false, t1 + 120_000)
        .await
        .unwrap();
    assert_eq!(names(&a), ["new_device", "new_network", "new_country"]);
    let home = r
        .assess_sign_in("u1", "127.0.0.1", true, t1 + 120_000)
        .await
        .unwrap();
    assert!(home.signals.is_empty(), "{home:?}");
}

#[tokio::test]
async fn a_reported_sign_in_places_the_account_where_it_was_before() {
    let r = engine(true).await;
    let t0 = 1_700_000_000_000;
    let min = 60_000;
    // The owner in Berlin, then Frankfurt; a thief in Sydney ten minutes later.
    for (ip, t) in [
        ("127.0.1.1", t0),
        ("127.0.0.1", t0 + 4 * H),
        ("127.0.2.1", t0 + 4 * H + 10 * min),
    ] {
        let p = r.place(ip);
        r.record_sign_in("u1", ip, p.as_ref(), t).await.unwrap();
    }
    r.forget_sign_in("u1", "127.0.2.1", t0 + 4 * H + 20 * min)
        .await
        .unwrap();
    // The thief's next try is measured from Frankfurt again, not from nowhere.
    let a = r
        .assess_sign_in("u1", "127.0.2.9", false, t0 + 4 * H + 30 * min)
        .await
        .unwrap();
    assert_eq!(
        names(&a),
        [
            "new_device",
            "new_network",
            "new_country",
            "impossible_travel"
        ],
        "{a:?}"
    );
    assert_eq!(a.level, Level::High, "{a:?}");
    // The owner at home is not.
    let home = r
        .assess_sign_in("u1", "127.0.0.1", true, t0 + 4 * H + 30 * min)
        .await
        .unwrap();
    assert!(home.signals.is_empty(), "{home:?}");
    // A second report of the same place finds it gone; taking out Frankfurt leaves Berlin.
    r.forget_sign_in("u1", "127.0.2.1", t0 + 4 * H + 40 * min)
        .await
        .unwrap();
    r.forget_sign_in("u1", "127.0.0.1", t0 + 4 * H + 40 * min)
        .await
        .unwrap();
    let a = r
        .assess_sign_in("u1", "127.0.2.9", false, t0 + 4 * H + 50 * min)
        .await
        .unwrap();
    assert!(names(&a).contains(&"impossible_travel"), "{a:?}");
    let a = r
        .assess_sign_in("u1", "127.0.1.9", true, t0 + 4 * H + 50 * min)
        .await
        .unwrap();
    assert!(a.signals.is_empty(), "{a:?}");
}

#[tokio::test]
async fn histories_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        let config = RiskConfig {
            geoip_database: Some(geo_path()),
            ..RiskConfig::default()
        };
        risk_in(dir.path(), config).await.unwrap()
    };
    let t0 = 1_700_000_000_000;
    let first = open().await;
    let p = first.place("127.0.0.1");
    first
        .record_sign_in("u1", "127.0.0.1", p.as_ref(), t0)
        .await
        .unwrap();
    drop(first);
    let a = open()
        .await
        .assess_sign_in("u1", "127.0.2.1", false, t0 + H)
        .await
        .unwrap();
    assert_eq!(a.level, Level::High, "{a:?}");
}
