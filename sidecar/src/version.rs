//! Versioned served names for catalogue adapters: a changed source is a new version, loaded under a new name beside the old one.
//!
//! vLLM serves stale weights after a same-name reload (prefix-cache blocks of the old
//! weights, #42125; another adapter's output after a runtime add, #47724), so placement never
//! reloads a catalogue adapter in place: `fr` from `s3://b/fr-v2` is served as `fr@<hash>`,
//! the EPP rewrites `fr` to it once a server lists it, and the old name drains, then unloads.
//! The sidecars and the EPP compute the name from the same ConfigMap entry, so they agree
//! without asking each other.

use std::hash::Hasher;

/// Hex digits of the version tag.
const TAG_LEN: usize = 8;

/// The name catalogue adapter `id` is served under while its source is `source`.
pub fn served_name(id: &str, source: &str) -> String {
    // FNV-1a is fixed by its spec: every binary, of any build, tags a source alike.
    let mut h = fnv::FnvHasher::default();
    h.write(source.as_bytes());
    format!("{id}@{:0w$x}", h.finish() as u32, w = TAG_LEN)
}

/// The adapter id of a served name made by [`served_name`], `None` for any other name.
pub fn id_of(name: &str) -> Option<&str> {
    let (id, tag) = name.rsplit_once('@')?;
    (!id.is_empty() && tag.len() == TAG_LEN && tag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_new_source_is_a_new_name_and_the_same_source_the_same_name() {
        let v1 = served_name("fr", "/adapters/fr-v1");
        let v2 = served_name("fr", "/adapters/fr-v2");
        assert_ne!(v1, v2);
        assert_eq!(v1, served_name("fr", "/adapters/fr-v1"));
        // Pinned by value: a different tag in another build would reload every adapter.
        assert_eq!(v1, "fr@f69dbb77");
        assert_eq!(id_of(&v1), Some("fr"));
        for plain in [
            "fr",
            "fr@",
            "@f69dbb77",
            "fr@f69dbb7",
            "fr@f69dbb7z",
            "fr@f69dbb77a",
        ] {
            assert_eq!(id_of(plain), None, "{plain}");
        }
    }

    proptest! {
        #[test]
        fn every_served_name_names_its_id(id in "[a-z0-9@._/-]{1,40}", src in ".{0,80}") {
            let name = served_name(&id, &src);
            prop_assert_eq!(id_of(&name), Some(id.as_str()));
        }
    }
}
