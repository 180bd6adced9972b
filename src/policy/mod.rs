//! The operator policy and the pure rules built on it.
//!
//! Every number of the API contract (50 images per region, 128 share members, 10 for FullServer
//! images, 5 cross-region copies in flight, 40 imports in flight, 128 GiB per cross-region copy)
//! is a default of [`Policy`], overridable with a YAML file (`--policy`), because clouds and
//! their documents disagree on them.

pub mod copy;
pub mod image;
pub mod marketplace;
pub mod quota;
pub mod reference;
pub mod region;
pub mod share;

use std::path::Path;

use serde::Serialize;

/// A gibibyte: the unit of the policy's and the API's size limits.
pub const GIB: u64 = 1 << 30;

/// Limits the operator enforces. Every field has the API contract's default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Owned images per tenant and region.
    pub private_images_per_region: u64,
    /// Bytes of owned images per tenant and region (`None`: unlimited).
    pub image_bytes_per_region: Option<u64>,
    /// Imports in flight per tenant.
    pub concurrent_imports: u64,
    /// Cross-region copies in flight per tenant.
    pub concurrent_cross_region_copies: u64,
    /// Distinct tenants an image may be shared with.
    pub share_members_per_image: u64,
    /// Distinct tenants a FullServer image may be shared with.
    pub full_server_share_members_per_image: u64,
    /// Largest image a cross-region copy moves, in GiB.
    pub max_cross_region_copy_gib: u64,
    /// Largest image an import stores, in GiB (a Region's `maxImageSizeGiB` may lower it).
    pub max_image_size_gib: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            private_images_per_region: 50,
            image_bytes_per_region: None,
            concurrent_imports: 40,
            concurrent_cross_region_copies: 5,
            share_members_per_image: 128,
            full_server_share_members_per_image: 10,
            max_cross_region_copy_gib: 128,
            max_image_size_gib: 1024,
        }
    }
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML, or not a mapping at the top.
    #[error("policy file {path} is not a YAML mapping of limits: {reason}")]
    Syntax {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A key is unknown or its value is not allowed.
    #[error("policy file {path}: key `{key}`: {reason}")]
    Key {
        /// The file.
        path: String,
        /// The offending key.
        key: String,
        /// What to change.
        reason: String,
    },
}

/// Keys a policy file may set, in the order `--help` and the docs list them.
pub const POLICY_KEYS: [&str; 8] = [
    "privateImagesPerRegion",
    "imageBytesPerRegion",
    "concurrentImports",
    "concurrentCrossRegionCopies",
    "shareMembersPerImage",
    "fullServerShareMembersPerImage",
    "maxCrossRegionCopyGiB",
    "maxImageSizeGiB",
];

impl Policy {
    /// Reads a policy file: YAML, a mapping of the keys in [`POLICY_KEYS`] to non-negative
    /// integers; keys left out keep their defaults. `imageBytesPerRegion` may also be `null`
    /// (unlimited).
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: shown.clone(), source })?;
        Self::from_yaml(&text, &shown)
    }

    /// Parses policy YAML; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let syntax = |reason: String| PolicyError::Syntax { path: origin.to_string(), reason };
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| syntax(e.to_string()))?;
        let mut policy = Policy::default();
        let mapping = match value {
            serde_yaml_ng::Value::Null => return Ok(policy),
            serde_yaml_ng::Value::Mapping(m) => m,
            other => return Err(syntax(format!("found {} at the top", yaml_kind(&other)))),
        };
        for (key, value) in mapping {
            let Some(key) = key.as_str().map(str::to_string) else {
                return Err(syntax(format!("keys must be strings, found {}", yaml_kind(&key))));
            };
            let bad = |reason: String| PolicyError::Key { path: origin.to_string(), key: key.clone(), reason };
            if key == "imageBytesPerRegion" && value.is_null() {
                policy.image_bytes_per_region = None;
                continue;
            }
            let number = value
                .as_u64()
                .ok_or_else(|| bad(format!("must be a non-negative integer, found {}", yaml_kind(&value))))?;
            match key.as_str() {
                "privateImagesPerRegion" => policy.private_images_per_region = number,
                "imageBytesPerRegion" => policy.image_bytes_per_region = Some(number),
                "concurrentImports" => policy.concurrent_imports = number,
                "concurrentCrossRegionCopies" => policy.concurrent_cross_region_copies = number,
                "shareMembersPerImage" => policy.share_members_per_image = number,
                "fullServerShareMembersPerImage" => policy.full_server_share_members_per_image = number,
                "maxCrossRegionCopyGiB" => policy.max_cross_region_copy_gib = number,
                "maxImageSizeGiB" => policy.max_image_size_gib = number,
                _ => return Err(bad(format!("unknown key; known keys are {}", POLICY_KEYS.join(", ")))),
            }
        }
        Ok(policy)
    }
}

fn yaml_kind(value: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_keeps_the_api_defaults() {
        let p = Policy::from_yaml("", "p.yaml").unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!((p.private_images_per_region, p.concurrent_imports, p.concurrent_cross_region_copies), (50, 40, 5));
        assert_eq!(
            (p.share_members_per_image, p.full_server_share_members_per_image, p.max_cross_region_copy_gib),
            (128, 10, 128)
        );
    }

    #[test]
    fn keys_override_defaults() {
        let p = Policy::from_yaml("shareMembersPerImage: 256\nimageBytesPerRegion: 1099511627776\n", "p.yaml").unwrap();
        assert_eq!(p.share_members_per_image, 256);
        assert_eq!(p.image_bytes_per_region, Some(1 << 40));
        assert_eq!(p.private_images_per_region, 50);
    }

    #[test]
    fn bad_files_name_the_key_and_what_to_change() {
        let cases = [
            (
                "concurrentImports: many\n",
                "policy file p.yaml: key `concurrentImports`: must be a non-negative integer, found the string \"many\"",
            ),
            (
                "concurrentImports: -1\n",
                "policy file p.yaml: key `concurrentImports`: must be a non-negative integer, found the number -1",
            ),
            (
                "privateImages: 3\n",
                "policy file p.yaml: key `privateImages`: unknown key; known keys are privateImagesPerRegion, ",
            ),
            ("- 1\n", "policy file p.yaml is not a YAML mapping of limits: found a list at the top"),
            ("a: [\n", "policy file p.yaml is not a YAML mapping of limits: "),
        ];
        for (text, want) in cases {
            let err = Policy::from_yaml(text, "p.yaml").unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: got {err:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let err = Policy::from_file(Path::new("/nonexistent/policy.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("cannot read policy file /nonexistent/policy.yaml: "), "{err}");
    }
}
