//! Subscription tiers: what each tier may do. Built in, and overridable per tier
//! from the optional TOML file (`ULTRA_CONFIG_FILE`, tables `[tiers.<name>]`, read by
//! `common::settings`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The limits of one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, poem_openapi::Object)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Requests per minute on any `/v1` route.
    pub requests_per_minute: u32,
    /// Submissions per minute (`POST /v1/analyze`).
    pub analyze_per_minute: u32,
    /// Jobs queued or running at once.
    pub concurrent_jobs: u32,
    /// Models one job may name.
    pub models_per_job: u32,
    /// Tokens per UTC day, counted as each job's worst case until it ends.
    pub daily_tokens: u64,
    /// Event streams open at once (per api replica).
    #[serde(default = "default_streams")]
    pub concurrent_streams: u32,
    /// The longest deadline (`options.timeout_s`) a job may ask for, in seconds.
    #[serde(default = "default_max_job_seconds")]
    pub max_job_seconds: u32,
}

fn default_max_job_seconds() -> u32 {
    1_800
}

fn default_streams() -> u32 {
    10
}

/// The tier a user starts in.
pub const DEFAULT_TIER: &str = "free";

#[derive(Debug, Clone)]
pub struct Tiers(BTreeMap<String, Tier>);

/// The tiers' part of the configuration file; its other tables are ignored here. A
/// tier is given whole: a missing limit is a TOML error, not a silent default.
#[derive(Debug, Default, Deserialize)]
pub struct TiersFile {
    #[serde(default)]
    pub tiers: BTreeMap<String, Tier>,
}

impl Tiers {
    pub fn builtin() -> Self {
        let tier =
            |requests_per_minute, analyze_per_minute, concurrent_jobs, models_per_job, daily_tokens, streams| Tier {
                requests_per_minute,
                analyze_per_minute,
                concurrent_jobs,
                models_per_job,
                daily_tokens,
                concurrent_streams: streams,
                max_job_seconds: default_max_job_seconds(),
            };
        Self(BTreeMap::from([
            ("free".to_owned(), tier(60, 10, 2, 3, 100_000, 5)),
            ("basic".to_owned(), tier(300, 60, 5, 5, 1_000_000, 20)),
            ("premium".to_owned(), tier(1_000, 120, 20, 8, 10_000_000, 100)),
            ("enterprise".to_owned(), tier(5_000, 600, 100, 10, 100_000_000, 1_000)),
        ]))
    }

    /// The built-in tiers, with those the file defines replaced or added. A file can
    /// replace the default tier but not remove it, so it always exists.
    pub fn from_file(file: TiersFile) -> Self {
        let mut tiers = Self::builtin();
        tiers.0.extend(file.tiers);
        tiers
    }

    pub fn get(&self, name: &str) -> Option<&Tier> {
        self.0.get(name)
    }

    /// A user's tier; one that was removed from configuration falls back to the default.
    pub fn for_user(&self, name: &str) -> &Tier {
        self.0
            .get(name)
            .or_else(|| self.0.get(DEFAULT_TIER))
            .unwrap_or_else(|| unreachable!("the default tier always exists"))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_and_adds_tiers() {
        let file: TiersFile = toml::from_str(
            "[tiers.free]\nrequests_per_minute = 5\nanalyze_per_minute = 1\nconcurrent_jobs = 1\nmodels_per_job = 1\ndaily_tokens = 10\n\
             [tiers.team]\nrequests_per_minute = 50\nanalyze_per_minute = 5\nconcurrent_jobs = 3\nmodels_per_job = 2\ndaily_tokens = 1000\n",
        )
        .expect("parses");
        let tiers = Tiers::from_file(file);
        assert_eq!(tiers.for_user("free").requests_per_minute, 5);
        assert_eq!(tiers.for_user("team").daily_tokens, 1000);
        assert_eq!(tiers.for_user("premium").requests_per_minute, 1_000);
        assert_eq!(tiers.for_user("gone").requests_per_minute, 5, "unknown tiers fall back to free");
        let partial = toml::from_str::<TiersFile>("[tiers.free]\nrequests_per_minute = 5\n");
        assert!(partial.is_err(), "a partial tier is an error, not a silent default");
    }

    #[test]
    fn builtin_defaults_match_the_published_table() {
        let tiers = Tiers::builtin();
        let rpm: Vec<u32> =
            ["free", "basic", "premium", "enterprise"].iter().map(|t| tiers.for_user(t).requests_per_minute).collect();
        assert_eq!(rpm, [60, 300, 1_000, 5_000]);
        let analyze: Vec<u32> =
            ["free", "basic", "premium", "enterprise"].iter().map(|t| tiers.for_user(t).analyze_per_minute).collect();
        assert_eq!(analyze, [10, 60, 120, 600]);
    }
}
