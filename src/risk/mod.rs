//! Risk scoring of sign-ins and of sessions on the move.
//!
//! Every sign-in whose password was right is scored from what the gateway remembers of the
//! account's recent complete sign-ins (`risk.history`, in the ephemeral store under
//! `risk:hist:{user}`): a browser that is not a known device of the account, a network (/24 or
//! /64) it was not signed in from, and — with a GeoIP database (`risk.geoip_database`, MaxMind
//! DB format: GeoLite2/GeoIP2 City or Country, DB-IP) — a country it was not signed in from and
//! travel from the last sign-in's place faster than `risk.max_travel_speed`. The signals add up
//! to a score ([`Signal::weight`]); `risk.medium_score` and `risk.high_score` turn it into a
//! [`Level`]:
//!
//! - **medium**: a remembered device must still give the second factor;
//! - **high**: also, an account with a security key must use it (codes are refused, unless
//!   `risk.high_risk_factor = "any"`), and the owner is told at once that their password was
//!   entered from there (at most once an hour).
//!
//! Only complete sign-ins teach the history, so a guesser's attempts never make their place
//! familiar. A complete session remembers where it was last proven from ([`Fix`]); when its
//! device key proves itself from a place it could not have reached since (impossible travel),
//! the session is held until the user proves a second factor again ([`Session::risk_hold_ms`]),
//! and the owner is told.
//!
//! [`Session::risk_hold_ms`]: crate::session::Session::risk_hold_ms

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RiskConfig;
use crate::store::{EphemeralStore, StoreError, StoreResult};

#[cfg(test)]
mod tests;

/// How many networks and countries the history keeps per account (most recent first).
const HISTORY_LEN: usize = 20;

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
            Signal::NewCountry(c) => format!("a country ({c}) your account was not signed in from recently"),
            Signal::ImpossibleTravel { from, km, minutes } => format!(
                "{km} km from {} where your account was {minutes} minutes earlier — too far to travel in that time",
                from.describe()
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
}

impl History {
    fn note(list: &mut Vec<(String, i64)>, item: &str, now_ms: i64) {
        list.retain(|(v, _)| v != item);
        list.insert(0, (item.to_string(), now_ms));
        list.truncate(HISTORY_LEN);
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
        let geo = Geo { reader };
        // A database of another kind (ASN, anonymous IP) opens, but says nothing of places.
        let kind = geo.reader.metadata().database_type.to_ascii_lowercase();
        if !(kind.contains("city") || kind.contains("country")) {
            return Err(err(format!(
                "is a {:?} database; a City or Country database (GeoLite2-City, GeoIP2-Country, \
                 DB-IP city or country) is needed",
                geo.reader.metadata().database_type
            )));
        }
        Ok(geo)
    }

    fn place(&self, ip: IpAddr) -> Option<Place> {
        let found = self.reader.lookup(ip).ok()?;
        let record: GeoRecord = found.decode().ok()??;
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
        Some(Place { country, city, at })
    }
}

/// Opens the GeoIP database at `path` as the gateway will (`check-config`, `serve`'s preflight).
pub fn check_database(path: &Path) -> Result<(), GeoError> {
    Geo::open(path).map(|_| ())
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
    ephemeral: Arc<dyn EphemeralStore>,
}

impl Risk {
    /// Opens `risk.geoip_database`, if set.
    pub fn new(config: RiskConfig, ephemeral: Arc<dyn EphemeralStore>) -> Result<Self, GeoError> {
        let geo = match &config.geoip_database {
            Some(p) => Some(Arc::new(Geo::open(p)?)),
            None => None,
        };
        Ok(Self {
            config,
            geo: RwLock::new(geo),
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
        let km = distance_km(from.place.at?, to.at?);
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

    fn history_key(user_id: &str) -> String {
        format!("risk:hist:{{{user_id}}}")
    }

    async fn history(&self, user_id: &str) -> StoreResult<History> {
        Ok(self
            .ephemeral
            .get(&Self::history_key(user_id))
            .await?
            // A record that no longer reads (another version) is no history: signals fire,
            // which asks for more proof, never less.
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default())
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
        let history = self.history(user_id).await?;
        let place = self.place(ip);
        let mut signals = Vec::new();
        if !device_known {
            signals.push(Signal::NewDevice);
        }
        let network = crate::auth::flow::network_of(ip);
        if !history.networks.is_empty() && !history.networks.iter().any(|(n, _)| *n == network) {
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
    /// place), for the next assessment.
    pub async fn record_sign_in(
        &self,
        user_id: &str,
        ip: &str,
        place: Option<&Place>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut history = self.history(user_id).await?;
        History::note(
            &mut history.networks,
            &crate::auth::flow::network_of(ip),
            now_ms,
        );
        if let Some(p) = place {
            if let Some(c) = &p.country {
                History::note(&mut history.countries, c, now_ms);
            }
            if p.at.is_some() {
                history.last = Some(Fix {
                    place: p.clone(),
                    at_ms: now_ms,
                });
            }
        }
        let body = serde_json::to_vec(&history).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.ephemeral
            .put(&Self::history_key(user_id), &body, self.config.history)
            .await
    }

    /// Scores a complete session's device key proven from `ip`, last proven at `last`: the new
    /// fix to keep, and the assessment when the move looks risky (impossible travel).
    pub fn assess_move(
        &self,
        last: Option<&Fix>,
        ip: &str,
        now_ms: i64,
    ) -> (Option<Fix>, Option<Assessment>) {
        let Some(place) = self.place(ip) else {
            return (last.cloned(), None);
        };
        let travel = last.and_then(|l| self.travel(l, &place, now_ms));
        let fix = Fix {
            place: place.clone(),
            at_ms: now_ms,
        };
        let assessment = travel.map(|t| self.assessment(vec![t], Some(place)));
        (Some(fix), assessment)
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
