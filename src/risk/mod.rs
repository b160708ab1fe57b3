//! Risk scoring of sign-ins and of sessions on the move.
//!
//! Every sign-in whose password was right is scored from what the gateway remembers of the
//! account's recent complete sign-ins (`risk.history`, in the durable store's `risk_history`):
//! a browser that is not a known device of the account, a network (/24 or
//! /64) it was not signed in from, and — with a GeoIP database (`risk.geoip_database`, MaxMind
//! DB format: GeoLite2/GeoIP2 City or Country, DB-IP) — a country it was not signed in from and
//! travel from the last sign-in's place faster than `risk.max_travel_speed`. The signals add up
//! to a score ([`Signal::weight`]); `risk.medium_score` and `risk.high_score` turn it into a
//! [`Level`]:
//!
//! - **medium**: a remembered device must still give the second factor;
//! - **high**: also, an account with a security key must use it where keys work (app codes are
//!   refused, a recovery code is taken; `risk.high_risk_factor = "any"` takes app codes too), and
//!   the owner is told at once that their password was entered from there (at most once an
//!   hour); a session's impossible move holds it.
//!
//! Only complete sign-ins teach the history, so a guesser's attempts never make their place
//! familiar; a sign-in reported as "this wasn't me" is taken out of it again. A complete session
//! remembers where it was last proven from ([`Fix`]); when its device key proves itself from a
//! place it could not have reached since (impossible travel, scored high), the session is held until the user
//! proves a second factor again ([`Session::risk_hold_ms`]), and the owner is told. The fix
//! moves only to places the session could have reached, so a chain of short hops made in
//! seconds, or a detour through an address without coordinates, does not carry it away.
//!
//! [`Session::risk_hold_ms`]: crate::session::Session::risk_hold_ms

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RiskConfig;
use crate::store::{DurableStore, EphemeralStore, StoreError, StoreResult};

#[cfg(test)]
mod tests;

/// How old a session's fix may grow before a proof from the same place renews it.
pub const FIX_RENEWAL_MS: i64 = 5 * 60 * 1000;

/// How many networks and countries the history keeps per account (most recent first).
const HISTORY_LEN: usize = 20;
/// How many places before the last one an account's history keeps.
const EARLIER_PLACES: usize = 4;

/// How serious a sign-in or a session's move looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Low,
    Medium,
    High,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
        }
    }
}

/// Where an address is, as far as the GeoIP database knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// ISO 3166-1 alpha-2 country code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// City name (English), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Latitude and longitude in ten-thousandths of a degree, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<(i32, i32)>,
    /// How far off (km) the database says the coordinates may be: a record placed at a
    /// country's centre says so with a large radius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_km: Option<u32>,
}

impl Place {
    /// "Sydney, AU", "AU", or "an unknown place".
    pub fn describe(&self) -> String {
        match (&self.city, &self.country) {
            (Some(city), Some(c)) => format!("{city}, {c}"),
            (Some(city), None) => city.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => "an unknown place".into(),
        }
    }
}

/// A place and when someone was proven to be there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fix {
    pub place: Place,
    pub at_ms: i64,
}

/// One reason a sign-in or a move looks risky.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The browser is not a known device of the account.
    NewDevice,
    /// The client's /24 (/64) is not one the account signed in from recently.
    NewNetwork,
    /// The client's country is not one the account signed in from recently.
    NewCountry(String),
    /// From the last proven place to this one faster than `risk.max_travel_speed`.
    ImpossibleTravel { from: Place, km: u32, minutes: u32 },
}

impl Signal {
    /// What the signal adds to a score.
    pub fn weight(&self) -> u32 {
        match self {
            Signal::NewDevice => 25,
            Signal::NewNetwork => 15,
            Signal::NewCountry(_) => 30,
            Signal::ImpossibleTravel { .. } => 60,
        }
    }

    /// Its name in audit events and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Signal::NewDevice => "new_device",
            Signal::NewNetwork => "new_network",
            Signal::NewCountry(_) => "new_country",
            Signal::ImpossibleTravel { .. } => "impossible_travel",
        }
    }

    /// A sentence for the owner's mail.
    pub fn explain(&self) -> String {
        match self {
            Signal::NewDevice => "a browser your account was not used from before".into(),
            Signal::NewNetwork => "a network your account was not signed in from recently".into(),
            Signal::NewCountry(c) => {
                format!("a country ({c}) your account was not signed in from recently")
            }
            Signal::ImpossibleTravel { from, km, minutes } => format!(
                "{km} km from {} where your account was {} — too far to travel in that time",
                from.describe(),
                match minutes {
                    0 => "moments earlier".to_string(),
                    1 => "a minute earlier".to_string(),
                    m => format!("{m} minutes earlier"),
                }
            ),
        }
    }
}

/// The score of one sign-in or move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub score: u32,
    pub level: Level,
    pub signals: Vec<Signal>,
    /// Where the client is, when the database knows.
    pub place: Option<Place>,
}

impl Assessment {
    /// `score 45: new_network, new_country` (audit reason).
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.signals.iter().map(Signal::name).collect();
        let mut s = format!("score {}", self.score);
        if !names.is_empty() {
            s.push_str(": ");
            s.push_str(&names.join(", "));
        }
        if let Some(p) = &self.place {
            s.push_str(&format!(" ({})", p.describe()));
        }
        s
    }
}

/// What the ephemeral store keeps of an account's recent complete sign-ins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct History {
    /// Networks (`network_of`) with the last time (ms) they were seen, most recent first.
    #[serde(default)]
    networks: Vec<(String, i64)>,
    /// Countries with the last time they were seen, most recent first.
    #[serde(default)]
    countries: Vec<(String, i64)>,
    /// The last complete sign-in's place, when the database knew it.
    #[serde(default)]
    last: Option<Fix>,
    /// The places before it, most recent first, one entry a place ([`EARLIER_PLACES`]): where
    /// the account is placed again when its last place is taken out by a report.
    #[serde(default)]
    earlier: Vec<Fix>,
}

impl History {
    fn note(list: &mut Vec<(String, i64)>, item: &str, now_ms: i64) {
        list.retain(|(v, _)| v != item);
        list.insert(0, (item.to_string(), now_ms));
        list.truncate(HISTORY_LEN);
    }

    /// Drops what is older than `since_ms`.
    fn since(mut self, since_ms: i64) -> Self {
        self.networks.retain(|(_, t)| *t >= since_ms);
        self.countries.retain(|(_, t)| *t >= since_ms);
        self.last = self.last.filter(|f| f.at_ms >= since_ms);
        self.earlier.retain(|f| f.at_ms >= since_ms);
        self
    }

    /// Places the account at `fix`, keeping the place before it among the earlier ones.
    fn place_at(&mut self, fix: Fix) {
        if let Some(old) = self.last.take().filter(|old| old.place != fix.place) {
            self.earlier.retain(|f| f.place != old.place);
            self.earlier.insert(0, old);
            self.earlier.truncate(EARLIER_PLACES);
        }
        self.earlier.retain(|f| f.place != fix.place);
        self.last = Some(fix);
    }

    /// Takes `place` out: the account is placed where it was before, if it was placed there.
    fn unplace(&mut self, place: &Place) {
        self.earlier.retain(|f| f.place != *place);
        if self.last.as_ref().is_some_and(|f| f.place == *place) {
            self.last = (!self.earlier.is_empty()).then(|| self.earlier.remove(0));
        }
    }
}

/// Why the GeoIP database could not be used.
#[derive(Debug, thiserror::Error)]
#[error("risk.geoip_database {path}: {message}")]
pub struct GeoError {
    pub path: PathBuf,
    pub message: String,
}

/// An opened GeoIP database.
struct Geo {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

#[derive(Deserialize)]
struct GeoCountry {
    iso_code: Option<String>,
}

#[derive(Deserialize)]
struct GeoCity {
    names: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct GeoLocation {
    latitude: Option<f64>,
    longitude: Option<f64>,
    /// A uint16 in MaxMind's databases; taken from any unsigned integer type.
    accuracy_radius: Option<Radius>,
}

/// An accuracy radius in km, whatever unsigned integer type the database stored it as (the
/// reader refuses a type other than the one asked for).
struct Radius(u32);

impl<'de> Deserialize<'de> for Radius {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Radius;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an accuracy radius in km")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Radius, E> {
                Ok(Radius(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Radius, E> {
                Ok(Radius(u32::try_from(v.max(0)).unwrap_or(u32::MAX)))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Radius, E> {
                Ok(Radius(u32::try_from(v).unwrap_or(u32::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The parts of a GeoIP2/GeoLite2 City or Country record the gateway reads.
#[derive(Deserialize)]
struct GeoRecord {
    country: Option<GeoCountry>,
    registered_country: Option<GeoCountry>,
    city: Option<GeoCity>,
    location: Option<GeoLocation>,
}

impl Geo {
    fn open(path: &Path) -> Result<Self, GeoError> {
        let err = |message: String| GeoError {
            path: path.to_path_buf(),
            message,
        };
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| err(e.to_string()))?;
        // A damaged search tree opens, and then fails every lookup: read it all once now.
        reader
            .verify()
            .map_err(|e| err(format!("is damaged: {e}")))?;
        let geo = Geo { reader };
        // A database of another kind (ASN, anonymous IP) opens, but says nothing of places.
        let kind = geo.reader.metadata().database_type.to_ascii_lowercase();
        if !["city", "country", "enterprise"]
            .iter()
            .any(|k| kind.contains(k))
        {
            return Err(err(format!(
                "is a {:?} database; a City, Country or Enterprise database (GeoLite2-City, \
                 GeoIP2-Country, DB-IP City Lite) is needed",
                geo.reader.metadata().database_type
            )));
        }
        Ok(geo)
    }

    fn place(&self, ip: IpAddr) -> Option<Place> {
        let record: GeoRecord = match self.reader.lookup(ip).and_then(|f| f.decode()) {
            Ok(r) => r?,
            Err(e) => {
                tracing::warn!(error = %e, "GeoIP lookup failed; the place is unknown");
                return None;
            }
        };
        let country = record
            .country
            .and_then(|c| c.iso_code)
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))
            .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
            .map(|c| c.to_ascii_uppercase());
        let city = record
            .city
            .and_then(|c| c.names)
            .and_then(|mut n| n.remove("en"))
            .filter(|c| !c.is_empty() && c.len() <= 100 && !c.chars().any(char::is_control));
        let radius_km = record
            .location
            .as_ref()
            .and_then(|l| l.accuracy_radius.as_ref())
            .map(|r| r.0);
        let at = record.location.and_then(|l| {
            let (lat, lon) = (l.latitude?, l.longitude?);
            let ok = lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0;
            #[allow(clippy::cast_possible_truncation)]
            ok.then(|| {
                (
                    (lat * 10_000.0).round() as i32,
                    (lon * 10_000.0).round() as i32,
                )
            })
        });
        if country.is_none() && at.is_none() {
            return None;
        }
        Some(Place {
            country,
            city,
            at,
            radius_km: at.and(radius_km),
        })
    }
}

/// Opens the GeoIP database at `path` as the gateway will (`check-config`, `serve`'s preflight).
pub fn check_database(path: &Path) -> Result<(), GeoError> {
    Geo::open(path).map(|_| ())
}

/// How far apart two places are at the least (km): the distance between their coordinates
/// less both accuracy radii. `None` without coordinates on both.
fn apart_km(a: &Place, b: &Place) -> Option<f64> {
    let d = distance_km(a.at?, b.at?);
    let slack = f64::from(a.radius_km.unwrap_or(0)) + f64::from(b.radius_km.unwrap_or(0));
    Some((d - slack).max(0.0))
}

/// Great-circle distance in km between two points in ten-thousandths of a degree.
pub fn distance_km(a: (i32, i32), b: (i32, i32)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let rad = |v: i32| (f64::from(v) / 10_000.0).to_radians();
    let (lat1, lon1, lat2, lon2) = (rad(a.0), rad(a.1), rad(b.0), rad(b.1));
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// The risk engine of one gateway: its settings, the GeoIP database (replaced on SIGHUP) and
/// the store that keeps accounts' histories.
#[derive(Debug)]
pub struct Risk {
    config: RiskConfig,
    geo: RwLock<Option<Arc<Geo>>>,
    /// Where accounts' histories are kept.
    durable: Arc<dyn DurableStore>,
    /// Where the hourly mail allowances are kept.
    ephemeral: Arc<dyn EphemeralStore>,
}

impl Risk {
    /// Opens `risk.geoip_database`, if set (reading it whole once: call it off the runtime's
    /// worker threads for a large database).
    pub fn new(
        config: RiskConfig,
        durable: Arc<dyn DurableStore>,
        ephemeral: Arc<dyn EphemeralStore>,
    ) -> Result<Self, GeoError> {
        let geo = match &config.geoip_database {
            Some(p) => Some(Arc::new(Geo::open(p)?)),
            None => None,
        };
        Ok(Self {
            config,
            geo: RwLock::new(geo),
            durable,
            ephemeral,
        })
    }

    /// Reads the GeoIP database again (SIGHUP, after the weekly update). A file that does not
    /// open leaves the current one in use.
    pub fn reload(&self) -> Result<bool, GeoError> {
        let Some(p) = &self.config.geoip_database else {
            return Ok(false);
        };
        let fresh = Arc::new(Geo::open(p)?);
        *self.geo.write().unwrap_or_else(|e| e.into_inner()) = Some(fresh);
        Ok(true)
    }

    pub fn config(&self) -> &RiskConfig {
        &self.config
    }

    /// Where `ip` is, when a GeoIP database is configured and knows it.
    pub fn place(&self, ip: &str) -> Option<Place> {
        let ip: IpAddr = ip.parse::<IpAddr>().ok()?.to_canonical();
        let geo = self.geo.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        geo.place(ip)
    }

    /// The level of a score.
    pub fn level(&self, score: u32) -> Level {
        if score >= self.config.high_score {
            Level::High
        } else if score >= self.config.medium_score {
            Level::Medium
        } else {
            Level::Low
        }
    }

    fn assessment(&self, signals: Vec<Signal>, place: Option<Place>) -> Assessment {
        let score = signals.iter().map(Signal::weight).sum();
        Assessment {
            score,
            level: self.level(score),
            signals,
            place,
        }
    }

    /// The travel signal from `from` to `to` in the time between: a distance beyond
    /// `risk.min_travel_distance` (GeoIP places are rough) covered faster than
    /// `risk.max_travel_speed`.
    pub fn travel(&self, from: &Fix, to: &Place, now_ms: i64) -> Option<Signal> {
        let km = apart_km(&from.place, to)?;
        if km < f64::from(self.config.min_travel_distance) {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        let hours = (now_ms - from.at_ms).max(0) as f64 / 3_600_000.0;
        if km <= hours * f64::from(self.config.max_travel_speed) {
            return None;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(Signal::ImpossibleTravel {
            from: from.place.clone(),
            km: km.round() as u32,
            minutes: (hours * 60.0).round() as u32,
        })
    }

    /// The account's history as of `now_ms`: what is older than `risk.history` is forgotten.
    async fn history(&self, user_id: &str, now_ms: i64) -> StoreResult<History> {
        let keep = i64::try_from(self.config.history.as_millis()).unwrap_or(i64::MAX / 4);
        Ok(self
            .durable
            .risk_history(user_id)
            .await?
            // A document that no longer reads (another version) is no history.
            .and_then(|b| {
                serde_json::from_str::<History>(&b)
                    .inspect_err(|e| {
                        tracing::warn!(user = %user_id, error = %e, "unreadable risk history; starting a new one");
                    })
                    .ok()
            })
            .unwrap_or_default()
            .since(now_ms.saturating_sub(keep)))
    }

    async fn store_history(&self, user_id: &str, h: &History, now_ms: i64) -> StoreResult<()> {
        let body = serde_json::to_string(h).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.durable
            .set_risk_history(user_id, &body, now_ms / 1000)
            .await
    }

    /// Scores a sign-in of `user_id` from `ip` whose password (or first factor) was right;
    /// `device_known`: the browser showed a known device of this account.
    pub async fn assess_sign_in(
        &self,
        user_id: &str,
        ip: &str,
        device_known: bool,
        now_ms: i64,
    ) -> StoreResult<Assessment> {
        let history = self.history(user_id, now_ms).await?;
        let place = self.place(ip);
        let mut signals = Vec::new();
        if !device_known {
            signals.push(Signal::NewDevice);
        }
        // No history at all (a first sign-in, or none for `risk.history`): the network is as new
        // as any, but no country or place can be compared.
        let network = crate::auth::flow::network_of(ip);
        if !history.networks.iter().any(|(n, _)| *n == network) {
            signals.push(Signal::NewNetwork);
        }
        if let Some(p) = &place {
            if let Some(c) = &p.country {
                if !history.countries.is_empty() && !history.countries.iter().any(|(k, _)| k == c) {
                    signals.push(Signal::NewCountry(c.clone()));
                }
            }
            if let Some(last) = &history.last {
                signals.extend(self.travel(last, p, now_ms));
            }
        }
        Ok(self.assessment(signals, place))
    }

    /// Remembers a complete sign-in of `user_id` from `ip` at `place` (its network, country and
    /// place), for the next assessment. Returns the account's last known place after it: this
    /// one, or where the account was last placed when this place is not precise enough.
    pub async fn record_sign_in(
        &self,
        user_id: &str,
        ip: &str,
        place: Option<&Place>,
        now_ms: i64,
    ) -> StoreResult<Option<Fix>> {
        let mut history = self.history(user_id, now_ms).await?;
        History::note(
            &mut history.networks,
            &crate::auth::flow::network_of(ip),
            now_ms,
        );
        if let Some(p) = place {
            if let Some(c) = &p.country {
                History::note(&mut history.countries, c, now_ms);
            }
            if self.precise(p) {
                history.place_at(Fix {
                    place: p.clone(),
                    at_ms: now_ms,
                });
            }
        }
        self.store_history(user_id, &history, now_ms).await?;
        Ok(history.last)
    }

    /// Takes a sign-in from `ip` that its owner reported ("this wasn't me") out of the account's
    /// history: its network, its country and its place; an account last placed there is placed
    /// where it was before (the thief's next try is measured from the owner's place). An owner
    /// who is in that country too is asked for more at their next sign-in there, never less.
    pub async fn forget_sign_in(&self, user_id: &str, ip: &str, now_ms: i64) -> StoreResult<()> {
        let mut history = self.history(user_id, now_ms).await?;
        let network = crate::auth::flow::network_of(ip);
        history.networks.retain(|(n, _)| *n != network);
        if let Some(place) = self.place(ip) {
            if let Some(c) = &place.country {
                history.countries.retain(|(k, _)| k != c);
            }
            history.unplace(&place);
        }
        self.store_history(user_id, &history, now_ms).await
    }

    /// Scores a complete session's device key proven from `ip`, last proven at `last`: the fix
    /// to keep, and the assessment when the move looks risky (impossible travel).
    ///
    /// The fix moves only to a place the session could have reached in the time: a risky move
    /// keeps the old fix (the hold is lifted by a second factor, which sets the fix where it was
    /// given); a hop too short to count as travel but made too fast keeps it too, so a chain of
    /// such hops is measured from where it started; so does a place without coordinates. The
    /// same place renews the fix's time at most every [`FIX_RENEWAL_MS`].
    pub fn assess_move(
        &self,
        last: Option<&Fix>,
        ip: &str,
        now_ms: i64,
    ) -> (Option<Fix>, Option<Assessment>) {
        let Some(place) = self.place(ip).filter(|p| p.at.is_some()) else {
            return (last.cloned(), None);
        };
        let precise = self.precise(&place);
        let fix = Fix {
            place: place.clone(),
            at_ms: now_ms,
        };
        let Some(last) = last.filter(|l| l.place.at.is_some()) else {
            return (precise.then_some(fix), None);
        };
        if let Some(t) = self.travel(last, &place, now_ms) {
            let assessment = self.assessment(vec![t], Some(place));
            return (Some(last.clone()), Some(assessment));
        }
        // A coarse place (a country's centre, give or take a thousand km) can flag a move, but
        // a session is never placed there: anywhere in its circle would then be "reachable".
        let same = last.place == place && now_ms - last.at_ms < FIX_RENEWAL_MS;
        if !precise || same || !self.reachable(last, &place, now_ms) {
            return (Some(last.clone()), None);
        }
        (Some(fix), None)
    }

    /// Whether a place is known closely enough to stand for where someone was: coordinates
    /// whose accuracy radius is within `risk.min_travel_distance`.
    fn precise(&self, p: &Place) -> bool {
        p.at.is_some()
            && p.radius_km
                .is_none_or(|r| r <= self.config.min_travel_distance)
    }

    /// Where `ip` is, as a session's fix from now (a second factor given there).
    pub fn fix_at(&self, ip: &str, now_ms: i64) -> Option<Fix> {
        self.place(ip).filter(|p| self.precise(p)).map(|place| Fix {
            place,
            at_ms: now_ms,
        })
    }

    /// Whether `to` could be reached from `from` by `now_ms` at `risk.max_travel_speed`.
    fn reachable(&self, from: &Fix, to: &Place, now_ms: i64) -> bool {
        let Some(km) = apart_km(&from.place, to) else {
            return false;
        };
        #[allow(clippy::cast_precision_loss)]
        let hours = (now_ms - from.at_ms).max(0) as f64 / 3_600_000.0;
        km <= hours * f64::from(self.config.max_travel_speed)
    }

    /// Takes the right to mail `user_id` about `what` now: at most once an hour each, so a
    /// stream of attempts does not flood the owner's inbox.
    pub async fn may_notify(&self, user_id: &str, what: &str) -> StoreResult<bool> {
        self.ephemeral
            .put_if_absent(
                &format!("risk:mailed:{what}:{{{user_id}}}"),
                b"1",
                Duration::from_secs(3600),
            )
            .await
    }
}
