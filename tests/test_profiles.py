import pytest

from qdeploy.errors import ProfileError
from qdeploy.plugins import get_registry
from qdeploy.profiles import builtin_profile_dir, detect_profile_name, load_profile_file, profile_from_dict

REQUIRED = ["x86-avx2", "x86-avx512-vnni", "arm64-neon", "android-nnapi", "edge-tpu", "nvidia-t4",
            "nvidia-jetson-orin", "nvidia-h100"]


def test_required_profiles_ship_and_load():
    profiles = get_registry().profiles
    for name in REQUIRED:
        assert name in profiles, name
        prof = profiles[name]
        assert prof.backends, name
        assert all(t.fast for t in prof.backends)
        assert len(prof.sha256) == 64


def test_device_rules_are_data():
    reg = get_registry()
    nnapi = reg.profile("android-nnapi").backends[0]
    assert nnapi.weight_symmetric_only and nnapi.activation_symmetric_only
    tpu = reg.profile("edge-tpu").backends[0]
    assert tpu.full_integer_only and tpu.fast == ("int8",) and tpu.option("io_dtype") == "int8"
    t4 = reg.profile("nvidia-t4")
    assert t4.compute_capability == "7.5" and "bf16" not in t4.backends[0].fast
    assert "fp8" in reg.profile("nvidia-h100").backends[0].fast
    assert "fp8" not in reg.profile("nvidia-jetson-orin").backends[0].fast
    assert reg.profile("x86-avx2").backends[0].option("reduce_range") is True
    # FP16 on x86 CPUs is listed as slow (measured), never as fast
    assert "fp16" in reg.profile("x86-avx512-vnni").backends[1].slow


@pytest.mark.parametrize("flags, machine, gpu, expected", [
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", None, "x86-avx512-vnni"),
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "x86_64", None, "x86-avx512-bf16"),
    ({"avx2"}, "x86_64", None, "x86-avx2"),
    ({"asimd"}, "aarch64", None, "arm64-neon"),
    ({"avx2"}, "x86_64", ("Tesla T4", "7.5"), "nvidia-t4"),
    ({"asimd"}, "aarch64", ("Orin", "8.7"), "nvidia-jetson-orin"),
    ({"avx2"}, "x86_64", ("NVIDIA H100 80GB HBM3", "9.0"), "nvidia-h100"),
])
def test_detect(flags, machine, gpu, expected):
    assert detect_profile_name(flags, machine, gpu) == expected


def test_detect_this_host_gives_a_known_profile():
    assert detect_profile_name() in get_registry().profiles


def test_unknown_profile_suggests():
    with pytest.raises(ProfileError, match="did you mean 'nvidia-t4'"):
        get_registry().profile("nvidia-t5")


def test_malformed_profiles_are_refused(tmp_path):
    with pytest.raises(ProfileError, match="unknown key 'backnds'"):
        profile_from_dict({"name": "x", "description": "d", "device": "cpu", "backnds": []})
    with pytest.raises(ProfileError, match="'int3'"):
        profile_from_dict({"name": "x", "description": "d", "device": "cpu",
                           "backends": [{"backend": "onnxruntime", "fast": ["int3"]}]})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile_file(bad)


def test_profiles_are_data_only():
    for path in builtin_profile_dir().glob("*.toml"):
        text = path.read_text()
        assert "import" not in text and "def " not in text
