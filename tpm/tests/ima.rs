//! The IMA measurement list parser, replay and hub check (`cairn_tpm::ima`) against
//! lists built here byte for byte as the kernel writes them (`ima_measurements_show()`
//! in `security/integrity/ima/ima_fs.c`), with expected values computed independently
//! (the `sha2` crate; the module uses ring). Two entries are real kernel output, copied
//! from a linux-integrity mailing-list post, so the template-digest rule is checked
//! against the kernel itself and not only against our reading of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cairn_tpm::ima::{
    self, BOOT_AGGREGATE, Bank, ImaError, ImaLog, ImaSummary, boot_aggregate_sha256, parse,
    verify_ima,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn sha1(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().to_vec()
}

/// A template field: u32 length (little-endian), then the bytes.
fn field(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// `d-ng`: `<algo>:\0<digest>`.
fn d_ng(algo: &str, digest: &[u8]) -> Vec<u8> {
    [algo.as_bytes(), b":\0", digest].concat()
}

/// `n-ng`: the name with its NUL.
fn n_ng(name: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0"].concat()
}

fn template_data(fields: &[&[u8]]) -> Vec<u8> {
    fields.iter().flat_map(|f| field(f)).collect()
}

/// Writes records as `binary_runtime_measurements*` holds them.
struct ListWriter {
    out: Vec<u8>,
}

impl ListWriter {
    fn new() -> Self {
        Self { out: Vec::new() }
    }

    /// Any template but `ima`: PCR, digest, name length + name, data length + data.
    fn entry(&mut self, pcr: u32, digest: &[u8], template: &str, data: &[u8]) -> &mut Self {
        self.out.extend_from_slice(&pcr.to_le_bytes());
        self.out.extend_from_slice(digest);
        self.out.extend(field(template.as_bytes()));
        self.out.extend(field(data));
        self
    }

    /// The legacy `ima` template: no data length; `d` raw, `n` as length + name.
    fn legacy(&mut self, pcr: u32, digest: &[u8], d: &[u8; 20], name: &str) -> &mut Self {
        self.out.extend_from_slice(&pcr.to_le_bytes());
        self.out.extend_from_slice(digest);
        self.out.extend(field(b"ima"));
        self.out.extend_from_slice(d);
        self.out.extend(field(name.as_bytes()));
        self
    }

    /// A sha256 per-bank entry whose template digest is that of its data.
    fn sha256_entry(&mut self, template: &str, fields: &[&[u8]]) -> &mut Self {
        let data = template_data(fields);
        self.entry(10, &sha256(&[&data]), template, &data)
    }

    /// A violation: all-zero template digest, all-zero file digest.
    fn sha256_violation(&mut self, path: &str) -> &mut Self {
        let data = template_data(&[&d_ng("sha256", &[0; 32]), &n_ng(path)]);
        self.entry(10, &[0; 32], "ima-ng", &data)
    }
}

/// PCRs 0–9 of a pretend boot.
fn boot_pcrs() -> BTreeMap<u32, [u8; 32]> {
    (0..=9).map(|i| (i, sha256(&[&[i as u8; 7]]))).collect()
}

const BASH: [u8; 32] = [0xba; 32];
const LIBC: [u8; 32] = [0x1c; 32];
const SSHD: [u8; 32] = [0x55; 32];
const SIG: &[u8] = b"\x03\x02\x04\xde\xad\xbe\xef signature blob";
const CMDLINE: &[u8] = b"root=/dev/mmcblk0p3 ro quiet";

/// boot_aggregate, two files, a signed file, a buffer, a violation, another file.
fn sample() -> Vec<u8> {
    let agg = boot_aggregate_sha256(&boot_pcrs()).unwrap();
    let mut w = ListWriter::new();
    w.sha256_entry("ima-ng", &[&d_ng("sha256", &agg), &n_ng(BOOT_AGGREGATE)])
        .sha256_entry("ima-ng", &[&d_ng("sha256", &BASH), &n_ng("/usr/bin/bash")])
        .sha256_entry(
            "ima-ng",
            &[&d_ng("sha256", &LIBC), &n_ng("/usr/lib/libc.so.6")],
        )
        .sha256_entry(
            "ima-sig",
            &[&d_ng("sha256", &SSHD), &n_ng("/usr/sbin/sshd"), SIG],
        )
        .sha256_entry(
            "ima-buf",
            &[
                &d_ng("sha256", &sha256(&[CMDLINE])),
                &n_ng("kexec-cmdline"),
                CMDLINE,
            ],
        )
        .sha256_violation("/var/log/messages")
        .sha256_entry(
            "ima-ng",
            &[&d_ng("sha256", &[0x77; 32]), &n_ng("/usr/bin/cairn-agent")],
        );
    w.out
}

/// PCR 10 after the first `n` entries of `list`, computed here.
fn expected_pcr10(list: &ImaLog, n: usize) -> [u8; 32] {
    list.entries.iter().take(n).fold([0u8; 32], |pcr, e| {
        let value = if e.template_digest.iter().all(|&b| b == 0) {
            vec![0xff; 32]
        } else {
            e.template_digest.clone()
        };
        sha256(&[&pcr, &value])
    })
}

/// Writes a parsed list back out (the writer's inverse).
fn serialize(list: &ImaLog) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &list.entries {
        out.extend_from_slice(&e.pcr.to_le_bytes());
        out.extend_from_slice(&e.template_digest);
        out.extend(field(e.template_name.as_bytes()));
        if e.template_name == "ima" {
            out.extend_from_slice(&e.template_data);
        } else {
            out.extend(field(&e.template_data));
        }
    }
    out
}

#[test]
fn parses_a_spec_exact_list_and_round_trips() {
    let bytes = sample();
    let list = parse(&bytes, Bank::Sha256).unwrap();
    assert_eq!(list.bank, Bank::Sha256);
    assert_eq!(list.entries.len(), 7);
    assert_eq!(serialize(&list), bytes);
    list.check_template_digests().unwrap();

    let names: Vec<_> = list
        .entries
        .iter()
        .map(|e| String::from_utf8(e.name().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "boot_aggregate",
            "/usr/bin/bash",
            "/usr/lib/libc.so.6",
            "/usr/sbin/sshd",
            "kexec-cmdline",
            "/var/log/messages",
            "/usr/bin/cairn-agent"
        ]
    );
    assert!(list.entries[0].is_boot_aggregate());
    assert!(list.entries.iter().all(|e| e.pcr == ima::IMA_PCR));

    let bash = &list.entries[1];
    assert_eq!(bash.template_name, "ima-ng");
    assert_eq!(bash.field_ids().unwrap(), ["d-ng", "n-ng"]);
    let d = bash.file_digest().unwrap();
    assert_eq!(
        (d.digest_type, d.algo, d.digest),
        (None, Some("sha256"), &BASH[..])
    );
    assert_eq!(bash.field("n-ng").unwrap(), b"/usr/bin/bash\0");

    let sshd = &list.entries[3];
    assert_eq!(sshd.field("sig").unwrap(), SIG);
    assert_eq!(sshd.fields().count(), 3);
    assert_eq!(list.entries[4].field("buf").unwrap(), CMDLINE);

    let violation = &list.entries[5];
    assert!(violation.is_violation());
    assert_eq!(violation.file_digest().unwrap().digest, &[0u8; 32][..]);
    assert_eq!(list.entries.iter().filter(|e| e.is_violation()).count(), 1);
}

#[test]
fn replays_pcr10_extending_violations_as_all_ff() {
    let list = parse(&sample(), Bank::Sha256).unwrap();
    let want = expected_pcr10(&list, list.entries.len());
    let replayed = list.replay(Bank::Sha256).unwrap();
    assert_eq!(replayed.keys().copied().collect::<Vec<_>>(), [10]);
    assert_eq!(replayed[&10], want);
    assert_eq!(list.replay_pcr(Bank::Sha256, 10).unwrap().unwrap(), want);
    assert_eq!(list.replay_pcr(Bank::Sha256, 11).unwrap(), None);

    // Extending the violation's zeros as they stand gives another value.
    let naive = list
        .entries
        .iter()
        .fold([0u8; 32], |pcr, e| sha256(&[&pcr, &e.template_digest]));
    assert_ne!(naive, want);
}

#[test]
fn verify_ima_accepts_the_quoted_pcr10() {
    let bytes = sample();
    let list = parse(&bytes, Bank::Sha256).unwrap();
    let quoted = expected_pcr10(&list, list.entries.len());
    let summary = verify_ima(&bytes, &quoted).unwrap();
    let agg = boot_aggregate_sha256(&boot_pcrs()).unwrap();
    assert_eq!(
        summary,
        ImaSummary {
            entries: 7,
            files: 4,
            buffers: 1,
            violations: 1,
            pending: 0,
            boot_aggregate: Some(ima::BootAggregate {
                algo: "sha256".into(),
                digest: agg.to_vec(),
            }),
        }
    );
    // The boot aggregate is sha256 over PCRs 0–9, in order.
    let concat: Vec<u8> = boot_pcrs().values().flatten().copied().collect();
    assert_eq!(agg, sha256(&[&concat]));
    assert_eq!(boot_aggregate_sha256(&BTreeMap::new()), None);
}

#[test]
fn verify_ima_rejects_a_quote_the_list_does_not_explain() {
    let bytes = sample();
    let err = verify_ima(&bytes, &[0x42; 32]).unwrap_err();
    let ImaError::Mismatch {
        entries,
        log,
        quoted,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*entries, 7);
    assert_eq!(quoted, &"42".repeat(32));
    let list = parse(&bytes, Bank::Sha256).unwrap();
    assert_eq!(log, &hex::encode(expected_pcr10(&list, 7)));
    assert!(err.to_string().contains("does not replay"), "{err}");
}

#[test]
fn entries_after_the_quote_are_pending_not_attested() {
    let bytes = sample();
    let list = parse(&bytes, Bank::Sha256).unwrap();
    // The agent quoted after 4 entries and read the list after 3 more were added.
    let summary = verify_ima(&bytes, &expected_pcr10(&list, 4)).unwrap();
    assert_eq!(
        (
            summary.entries,
            summary.pending,
            summary.files,
            summary.buffers,
            summary.violations
        ),
        (4, 3, 3, 0, 0)
    );
    // A list read before the quote (shorter than it) does not verify.
    let short = serialize(&ImaLog {
        bank: Bank::Sha256,
        entries: list.entries[..3].to_vec(),
    });
    assert!(matches!(
        verify_ima(&short, &expected_pcr10(&list, 4)),
        Err(ImaError::Mismatch { .. })
    ));
    // PCR 10 untouched: nothing attested, everything pending.
    let s = verify_ima(&bytes, &[0; 32]).unwrap();
    assert_eq!((s.entries, s.pending, s.boot_aggregate), (0, 7, None));
}

#[test]
fn altered_entries_are_detected() {
    let bytes = sample();
    let list = parse(&bytes, Bank::Sha256).unwrap();
    let quoted = expected_pcr10(&list, 7);

    // A different file hash under the same template digest: the data is not bound.
    let mut forged = list.clone();
    let e = &mut forged.entries[1];
    let at = e
        .template_data
        .windows(BASH.len())
        .position(|w| w == BASH)
        .unwrap();
    e.template_data[at] ^= 1;
    assert_eq!(
        verify_ima(&serialize(&forged), &quoted),
        Err(ImaError::TemplateDigest {
            entry: 1,
            offset: list.entries[1].offset
        })
    );

    // Consistent data and digest for another file: PCR 10 says no.
    let mut w = ListWriter::new();
    w.sha256_entry(
        "ima-ng",
        &[&d_ng("sha256", &[1; 32]), &n_ng(BOOT_AGGREGATE)],
    );
    let mut forged = list.clone();
    forged.entries[0] = parse(&w.out, Bank::Sha256).unwrap().entries.remove(0);
    assert!(matches!(
        verify_ima(&serialize(&forged), &quoted),
        Err(ImaError::Mismatch { .. })
    ));

    // An entry dropped, or two swapped: PCR 10 says no.
    let mut dropped = list.clone();
    dropped.entries.remove(2);
    assert!(verify_ima(&serialize(&dropped), &quoted).is_err());
    let mut swapped = list.clone();
    swapped.entries.swap(1, 2);
    assert!(verify_ima(&serialize(&swapped), &quoted).is_err());
}

#[test]
fn entries_for_other_pcrs_are_refused_by_the_pcr10_check() {
    let mut w = ListWriter::new();
    let data = template_data(&[&d_ng("sha256", &BASH), &n_ng("/usr/bin/bash")]);
    w.sha256_entry(
        "ima-ng",
        &[&d_ng("sha256", &LIBC), &n_ng("/usr/lib/libc.so.6")],
    )
    .entry(11, &sha256(&[&data]), "ima-ng", &data);
    let list = parse(&w.out, Bank::Sha256).unwrap();
    let replayed = list.replay(Bank::Sha256).unwrap();
    assert_eq!(replayed.keys().copied().collect::<Vec<_>>(), [10, 11]);
    assert_eq!(
        verify_ima(&w.out, &expected_pcr10(&list, 1)),
        Err(ImaError::OtherPcr { entry: 1, pcr: 11 })
    );
}

#[test]
fn the_sha1_list_replays_the_sha1_bank_only() {
    // The same entries as the kernel writes them to binary_runtime_measurements.
    let mut w = ListWriter::new();
    let data = template_data(&[&d_ng("sha256", &BASH), &n_ng("/usr/bin/bash")]);
    w.entry(10, &sha1(&[&data]), "ima-ng", &data);
    let violation = template_data(&[&d_ng("sha256", &[0; 32]), &n_ng("/tmp/x")]);
    w.entry(10, &[0; 20], "ima-ng", &violation);
    let list = parse(&w.out, Bank::Sha1).unwrap();
    list.check_template_digests().unwrap();

    let pcr = sha1(&[&[0u8; 20], &sha1(&[&data])]);
    let pcr = sha1(&[&pcr, &[0xff; 20]]);
    assert_eq!(list.replay(Bank::Sha1).unwrap()[&10], pcr);

    let err = list.replay(Bank::Sha256).unwrap_err();
    assert_eq!(
        err,
        ImaError::WrongBank {
            list: Bank::Sha1,
            asked: Bank::Sha256
        }
    );
    assert!(
        err.to_string()
            .contains("binary_runtime_measurements_sha256"),
        "{err}"
    );
    // The hub's check reads the per-bank format: a sha1 list is not mistaken for it.
    assert!(matches!(
        verify_ima(&w.out, &[0; 32]),
        Err(ImaError::Malformed { entry: 0, .. })
    ));
}

/// Two lines of `ascii_runtime_measurements` (sha1 template digests) as a kernel printed
/// them, from Roberto Sassu's "Re: [RFC][PATCH v2 00/13] integrity: Introduce a digest
/// cache" (linux-integrity, 2023-09-05; the first one on PCR 11 by policy) and another
/// public IMA example. Rebuilt in binary form, they must parse and their template
/// digests must be the sha1 of their data.
#[test]
fn template_digests_match_real_kernel_output() {
    let real = [
        (
            11,
            "50b5a68bea0776a84eef6725f17ce474756e51c0",
            "15e1efee080fe54f5d7404af7e913de01671e745ce55215d89f3d6521d3884f0",
            "/root/cat",
        ),
        (
            10,
            "bb24b135e1c911c97aad8f1c1863efc08cd44c11",
            "d41dd4adacf5a35df426461dd8a92d7bdd5ba29bb61a1c3531bec0ada386f8dd",
            "/usr/lib/x86_64-linux-gnu/libresolv.so.2",
        ),
    ];
    let mut w = ListWriter::new();
    for (pcr, template_hash, file_hash, path) in real {
        let data = template_data(&[
            &d_ng("sha256", &hex::decode(file_hash).unwrap()),
            &n_ng(path),
        ]);
        w.entry(pcr, &hex::decode(template_hash).unwrap(), "ima-ng", &data);
    }
    let list = parse(&w.out, Bank::Sha1).unwrap();
    list.check_template_digests().unwrap();
    let pcrs = list.replay(Bank::Sha1).unwrap();
    assert_eq!(pcrs.keys().copied().collect::<Vec<_>>(), [10, 11]);
    assert_eq!(list.entries[0].name().unwrap(), b"/root/cat");
}

#[test]
fn the_legacy_ima_template_has_no_data_length_and_a_padded_name() {
    let d = [0xd1; 20];
    let name = "/sbin/init";
    let padded: Vec<u8> = name.bytes().chain(std::iter::repeat(0)).take(256).collect();
    let mut w = ListWriter::new();
    w.legacy(10, &sha1(&[&d, &padded]), &d, name)
        .legacy(10, &[0; 20], &[0; 20], "/tmp/violated");
    let list = parse(&w.out, Bank::Sha1).unwrap();
    assert_eq!(serialize(&list), w.out);
    list.check_template_digests().unwrap();
    let e = &list.entries[0];
    assert_eq!(e.name().unwrap(), name.as_bytes());
    let fd = e.file_digest().unwrap();
    assert_eq!((fd.algo, fd.digest), (None, &d[..]));
    assert!(list.entries[1].is_violation());

    // Hashing the name unpadded (as for other templates) would not match.
    let mut wrong = ListWriter::new();
    wrong.legacy(10, &sha1(&[&d, name.as_bytes()]), &d, name);
    assert!(matches!(
        parse(&wrong.out, Bank::Sha1)
            .unwrap()
            .check_template_digests(),
        Err(ImaError::TemplateDigest { entry: 0, .. })
    ));
}

#[test]
fn an_empty_list_replays_to_nothing() {
    let list = parse(&[], Bank::Sha256).unwrap();
    assert!(list.entries.is_empty());
    assert!(list.replay(Bank::Sha256).unwrap().is_empty());
    assert_eq!(verify_ima(&[], &[0; 32]).unwrap().entries, 0);
    assert!(matches!(
        verify_ima(&[], &[1; 32]),
        Err(ImaError::Mismatch { entries: 0, .. })
    ));
}

#[test]
fn every_truncation_is_an_error_or_a_shorter_list() {
    let bytes = sample();
    let full = parse(&bytes, Bank::Sha256).unwrap();
    let boundaries: Vec<usize> = full.entries.iter().map(|e| e.offset).collect();
    for cut in 0..bytes.len() {
        match parse(&bytes[..cut], Bank::Sha256) {
            Ok(list) => {
                assert!(boundaries.contains(&cut), "cut {cut} parsed");
                assert_eq!(list.entries[..], full.entries[..list.entries.len()]);
            }
            Err(ImaError::Truncated {
                offset, need, have, ..
            }) => {
                assert!(!boundaries.contains(&cut), "cut {cut}");
                assert!(offset <= cut && need > have, "cut {cut}");
            }
            Err(e) => panic!("cut {cut}: {e}"),
        }
    }
}

#[test]
fn malformed_records_say_what_and_where() {
    let good = sample();

    // A big-endian kernel's PCR 10.
    let mut be = good.clone();
    be[..4].copy_from_slice(&10u32.to_be_bytes());
    let err = parse(&be, Bank::Sha256).unwrap_err();
    assert!(
        matches!(
            err,
            ImaError::Malformed {
                entry: 0,
                offset: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ima_canonical_fmt"), "{err}");

    // A template name length beyond any template's.
    let mut w = ListWriter::new();
    w.out.extend_from_slice(&10u32.to_le_bytes());
    w.out.extend_from_slice(&[1; 32]);
    w.out.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
    assert!(matches!(
        parse(&w.out, Bank::Sha256),
        Err(ImaError::Malformed {
            entry: 0,
            offset: 36,
            ..
        })
    ));

    // An empty or unprintable template name.
    for name in ["", "ima ng", "ima\0"] {
        let mut w = ListWriter::new();
        w.entry(10, &[1; 32], name, &[]);
        assert!(
            matches!(parse(&w.out, Bank::Sha256), Err(ImaError::Malformed { .. })),
            "{name:?}"
        );
    }

    // A field running past the template data.
    let mut w = ListWriter::new();
    w.sha256_entry("ima-ng", &[&d_ng("sha256", &BASH), &n_ng("/usr/bin/bash")]);
    let mut data = template_data(&[&d_ng("sha256", &BASH)]);
    data.extend_from_slice(&100u32.to_le_bytes());
    data.extend_from_slice(b"/short\0");
    w.entry(10, &[1; 32], "ima-ng", &data);
    let err = parse(&w.out, Bank::Sha256).unwrap_err();
    assert!(
        matches!(
            err,
            ImaError::Truncated {
                entry: 1,
                what: "template field",
                ..
            }
        ),
        "{err}"
    );

    // An ima-ng entry with a third field.
    let mut w = ListWriter::new();
    w.sha256_entry("ima-ng", &[b"a", b"b", b"c"]);
    let err = parse(&w.out, Bank::Sha256).unwrap_err();
    assert!(err.to_string().contains("2 fields"), "{err}");

    // Template data larger than accepted.
    let mut w = ListWriter::new();
    w.entry(10, &[1; 32], "ima-ng", &[]);
    let at = w.out.len() - 4;
    w.out[at..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        parse(&w.out, Bank::Sha256),
        Err(ImaError::Malformed { .. })
    ));

    // A custom template format string is split into its fields; unknown templates
    // are kept as raw fields.
    let mut w = ListWriter::new();
    w.sha256_entry(
        "d-ng|n-ng|buf",
        &[&d_ng("sha256", &LIBC), &n_ng("x"), b"buf"],
    )
    .sha256_entry("future-tmpl", &[b"one", b"two", b"three"]);
    let list = parse(&w.out, Bank::Sha256).unwrap();
    assert_eq!(list.entries[0].field("buf").unwrap(), b"buf");
    assert_eq!(list.entries[1].field_ids(), None);
    assert_eq!(list.entries[1].fields().count(), 3);
    list.check_template_digests().unwrap();
}

/// Parses the running kernel's lists when this machine exposes them (IMA on and
/// securityfs readable); otherwise says why it checked nothing.
#[test]
fn the_running_kernels_lists_parse_when_present() {
    let dir = std::path::Path::new(ima::SECURITYFS_DIR);
    let mut checked = 0;
    for (file, bank) in [
        ("binary_runtime_measurements".to_string(), Bank::Sha1),
        (Bank::Sha256.list_file(), Bank::Sha256),
    ] {
        let path = dir.join(&file);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipping {}: {e}", path.display());
                continue;
            }
        };
        let list = parse(&bytes, bank).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        list.check_template_digests().unwrap();
        list.replay(bank).unwrap();
        if let Some(first) = list.entries.first() {
            assert!(first.is_boot_aggregate(), "{}", path.display());
        }
        eprintln!("{}: {} entries", path.display(), list.entries.len());
        checked += 1;
    }
    if checked == 0 {
        eprintln!("no readable IMA list on this machine: nothing checked");
    }
}

fn arb_entry() -> impl Strategy<Value = (u32, String, Vec<Vec<u8>>, bool)> {
    (
        prop_oneof![Just(10u32), 0u32..=23],
        prop_oneof![
            Just("ima-ng".to_string()),
            Just("ima-sig".to_string()),
            Just("ima-buf".to_string()),
            "[a-z|-]{1,12}"
                .prop_filter("the legacy template is written differently", |s| s != "ima")
        ],
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
        any::<bool>(),
    )
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for bank in [Bank::Sha1, Bank::Sha256, Bank::Sha384, Bank::Sha512] {
            if let Ok(list) = parse(&bytes, bank) {
                let _ = list.check_template_digests();
                prop_assert!(list.replay(bank).is_ok());
                prop_assert_eq!(serialize(&list), bytes.clone());
            }
        }
        let _ = verify_ima(&bytes, &[0; 32]);
    }

    #[test]
    fn mutated_lists_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = sample();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let quoted = [7; 32];
        let _ = verify_ima(&bytes, &quoted);
        let cut = cut.index(bytes.len() + 1);
        let _ = verify_ima(&bytes[..cut], &quoted);
        if let Ok(list) = parse(&bytes, Bank::Sha256) {
            let _ = list.check_template_digests();
            let _ = list.replay(Bank::Sha256);
            for e in &list.entries {
                let _ = (e.file_digest(), e.name(), e.is_boot_aggregate());
            }
        }
    }

    #[test]
    fn built_lists_round_trip_and_replay(entries in proptest::collection::vec(arb_entry(), 0..12)) {
        let mut w = ListWriter::new();
        let mut want: BTreeMap<u32, [u8; 32]> = BTreeMap::new();
        for (pcr, template, fields, violation) in &entries {
            let refs: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
            let data = template_data(&refs);
            let digest = if *violation { [0; 32] } else { sha256(&[&data]) };
            w.entry(*pcr, &digest, template, &data);
            let value = if *violation { [0xff; 32] } else { digest };
            let cur = want.entry(*pcr).or_insert([0; 32]);
            *cur = sha256(&[&cur[..], &value]);
        }
        match parse(&w.out, Bank::Sha256) {
            Ok(list) => {
                prop_assert_eq!(serialize(&list), w.out.clone());
                prop_assert!(list.check_template_digests().is_ok());
                let got = list.replay(Bank::Sha256).unwrap();
                let want: BTreeMap<u32, Vec<u8>> =
                    want.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
                prop_assert_eq!(got, want);
            }
            // Only a known template with the wrong number of fields is refused.
            Err(ImaError::Malformed { reason, .. }) => {
                prop_assert!(reason.contains("fields"), "{}", reason);
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}
