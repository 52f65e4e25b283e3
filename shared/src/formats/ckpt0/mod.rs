//! Reader of the official Grok-1 release (`ckpt-0`, GROK1_SPEC.md §6): 770 files
//! `tensor{idx:05d}_000`, each a Python pickle of a numpy array (fp32) or a
//! `__main__.QuantizedWeight8bit(weight: int8 array, scales: bf16 array)`.
//!
//! The pickle is interpreted by a small, closed virtual machine that knows exactly the opcodes
//! and the few globals those files use (numpy array and dtype reconstruction, `ml_dtypes`
//! bfloat16, the dataclass); any other global is refused by name and nothing is ever executed.
//! Array payloads are not copied: a parsed array refers to a byte range of the memory-mapped file,
//! so converting one tensor at a time keeps memory bounded by the largest output tensor. Arrays
//! numpy pickled in Fortran order are read in C order through [`c_order`] (a copy of just the
//! elements asked for). Every length, memo index and shape read from a file is checked, and the
//! machine's values are bounded (see `MAX_VALUES`), so no pickle can make it panic or allocate
//! more than its size justifies.

mod array;
mod convert;
mod pickle;

pub use array::{c_order, leaf_names, list_files, Ckpt0Error, Leaf, NpArray, NpDType};
pub use convert::convert_to_hf;
pub use pickle::{parse, TensorFile};

#[cfg(test)]
mod tests {
    use super::convert::matrix_out;
    use super::*;
    use std::borrow::Cow;
    use std::path::Path;

    #[test]
    fn refuses_unknown_globals_and_truncation() {
        // pickle.dumps(os.system) style: GLOBAL 'posix' 'system'.
        let evil = b"\x80\x04\x95\x12\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.";
        let e = parse(evil, Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("refusing pickle global `posix.system`"), "{e}");
        let e = parse(b"\x80\x04\x8c\x05ab", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert_eq!(leaf_names(64).len(), 770);
        assert_eq!(
            leaf_names(11)[2 + 12 * 2],
            "transformer/decoder_layer_10/moe/linear/w"
        );
    }

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|k| u8::from_str_radix(&h[k..k + 2], 16).unwrap())
            .collect()
    }

    // `pickle.dumps(x)` (protocol 4) of x = np.arange(6, dtype=np.float32).reshape(2, 3), in C
    // order and as np.asfortranarray(x); the same with protocol 5 (`_frombuffer`, order 'F');
    // y = np.arange(24, dtype=np.int8).reshape(2, 3, 4) in both orders.
    const HEAD: &str = "800495a3000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b03869468038c0564747970659493948c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b00749462";
    const C2: &str = "894318000000000000803f0000004000004040000080400000a040947494622e";
    const F2: &str = "88431800000000000040400000803f00008040000000400000a040947494622e";
    const F2_P5: &str = "8005958e000000000000008c136e756d70792e5f636f72652e6e756d65726963948c0b5f66726f6d6275666665729493942896180000000000000000000000000040400000803f00008040000000400000a040948c056e756d7079948c0564747970659493948c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b007494624b024b0386948c014694749452942e";
    const C3: &str = "800495a5000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b034b04879468038c0564747970659493948c02693194898887945294284b038c017c944e4e4e4affffffff4affffffff4b00749462894318000102030405060708090a0b0c0d0e0f1011121314151617947494622e";
    const F3: &str = "800495a5000000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b034b04879468038c0564747970659493948c02693194898887945294284b038c017c944e4e4e4affffffff4affffffff4b00749462884318000c04100814010d05110915020e06120a16030f07130b17947494622e";

    fn array_of(b: &[u8]) -> NpArray {
        match parse(b, Path::new("t")).unwrap() {
            Leaf::Array(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn fortran_order_arrays_read_in_c_order() {
        let want: Vec<f32> = (0..6).map(|x| x as f32).collect();
        for (what, b) in [
            ("C", unhex(&format!("{HEAD}{C2}"))),
            ("F", unhex(&format!("{HEAD}{F2}"))),
            ("F, protocol 5", unhex(F2_P5)),
        ] {
            let a = array_of(&b);
            assert_eq!(a.shape, vec![2, 3], "{what}");
            assert_eq!(a.fortran, what != "C", "{what}");
            let raw = &b[a.start..a.start + a.len];
            assert_eq!(f32s(&c_order(raw, &a, 0, 6)), want, "{what}");
            // Any range in C order, e.g. the second row.
            assert_eq!(f32s(&c_order(raw, &a, 3, 3)), want[3..], "{what}");
            // C order stays a view of the file.
            assert_eq!(
                matches!(c_order(raw, &a, 0, 6), Cow::Borrowed(_)),
                what == "C"
            );
        }
        let want: Vec<u8> = (0..24).collect();
        for b in [unhex(C3), unhex(F3)] {
            let a = array_of(&b);
            assert_eq!(a.shape, vec![2, 3, 4]);
            let raw = &b[a.start..a.start + a.len];
            assert_eq!(&*c_order(raw, &a, 0, 24), &want[..]);
            // The second of a stack of two [3, 4] matrices, and a range across rows.
            assert_eq!(&*c_order(raw, &a, 12, 12), &want[12..]);
            assert_eq!(&*c_order(raw, &a, 5, 9), &want[5..14]);
        }
    }

    #[test]
    fn stacked_experts_in_either_order_convert_alike_and_missing_experts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str, hex: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, unhex(hex)).unwrap();
            TensorFile::open(&p).unwrap()
        };
        let (c, f) = (open("c", C3), open("f", F3));
        for e in 0..2 {
            let a = matrix_out(&c, "w", Some((e, 2)), 3, 4, "x").unwrap();
            let b = matrix_out(&f, "w", Some((e, 2)), 3, 4, "x").unwrap();
            assert_eq!(a, b);
            // [in, out] = [3, 4] becomes [out, in].
            assert_eq!(a[0].2, vec![4, 3]);
            assert_eq!(
                a[0].3[..3],
                [12 * e as u8, 12 * e as u8 + 4, 12 * e as u8 + 8]
            );
        }
        // A stack of 2 where the config says 8 experts: a shape error, not a slice past the end.
        let e = matrix_out(&c, "w", Some((5, 8)), 3, 4, "x").unwrap_err();
        assert!(matches!(e, Ckpt0Error::Shape { .. }), "{e}");
    }

    fn pickle_err(b: &[u8]) -> String {
        let e = parse(b, Path::new("t")).unwrap_err().to_string();
        assert!(e.starts_with("t: "), "{e}");
        e
    }

    #[test]
    fn lengths_indices_and_sizes_from_the_file_are_checked() {
        // BINUNICODE8 of length 2^64 - 1: the end offset overflowed.
        let mut b = b"\x80\x04\x8d".to_vec();
        b.extend([0xff; 8]);
        assert!(pickle_err(&b).contains("truncated"));
        // LONG_BINPUT 0x7fffffff: resized the memo to 2^31 values.
        let e = pickle_err(b"\x80\x04Nr\xff\xff\xff\x7f.");
        assert!(e.contains("memo slot 2147483647 is out of order"), "{e}");
        // A shape whose byte count overflows: (2^62, 8) of f32.
        let ok = format!("{HEAD}{C2}");
        let bad = ok.replace("4b024b0386", "8a0800000000000000404b0886");
        assert_ne!(ok, bad);
        assert!(pickle_err(&unhex(&bad)).contains("overflows"));
        // Big-endian data would be read as garbage: refused.
        let be = ok.replace("8c013c94", "8c013e94");
        assert!(pickle_err(&unhex(&be)).contains("big-endian"));
    }

    #[test]
    fn nesting_and_memo_copies_are_bounded() {
        // 100000 nested tuples: dropping them recursed 100000 deep (a stack overflow).
        let mut b = b"\x80\x04)".to_vec();
        b.extend(std::iter::repeat_n(0x85u8, 100_000));
        b.push(b'.');
        assert!(pickle_err(&b).contains("tuple, list and dict operations"));
        // A 1000-item list memoized, then copied 100000 times (10^8 values).
        let mut b = b"\x80\x04](".to_vec();
        b.extend(std::iter::repeat_n(b'N', 1000));
        b.extend(b"e\x94");
        for _ in 0..100_000 {
            b.extend(b"h\x00");
        }
        b.push(b'.');
        assert!(pickle_err(&b).contains("values created or copied"));
    }
}
