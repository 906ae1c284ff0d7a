"""benchmarks/check_requirements.py: setup.py's requirements read without running it, missing and
wrong-version ones named."""

import textwrap

import pytest


@pytest.fixture
def check_requirements(load_benchmark):
    return load_benchmark("check_requirements")


def test_reads_the_real_setup_py(check_requirements):
    install, extras = check_requirements.read_requirements()
    names = [check_requirements.distribution_name(r) for r in install]
    for name in ("torch", "omegaconf", "webdataset", "submitit", "fvcore", "opencv-python-headless"):
        assert name in names
    assert "dev" in extras and "xformers" in extras
    assert check_requirements.import_name("opencv-python-headless") == "cv2"
    assert check_requirements.import_name("Pillow") == "PIL"
    assert check_requirements.import_name("typing-extensions") == "typing_extensions"
    # this environment runs the tests, so it meets install_requires
    assert check_requirements.main([]) == 0


def test_names_missing_and_wrong_version_requirements(check_requirements, tmp_path, capsys):
    pytest.importorskip("packaging")
    setup_py = tmp_path / "setup.py"
    setup_py.write_text(textwrap.dedent("""
        from setuptools import setup
        setup(
            name="x",
            install_requires=[
                "numpy",  # a comment, as in the real file
                "surely-not-installed-dinoscale-pkg>=1.0",
                "torch<1.0",
            ],
            extras_require={"more": ["pytest"]},
        )
    """))
    install, extras = check_requirements.read_requirements(setup_py)
    assert install == ["numpy", "surely-not-installed-dinoscale-pkg>=1.0", "torch<1.0"]
    assert extras == {"more": ["pytest"]}
    assert check_requirements.check("numpy") == ("numpy", None)
    assert check_requirements.check("surely-not-installed-dinoscale-pkg>=1.0") == (
        "surely-not-installed-dinoscale-pkg", "MISSING")
    dist, problem = check_requirements.check("torch<1.0")
    assert dist == "torch" and problem.startswith("WRONG VERSION ") and "<1.0" in problem

    assert check_requirements.main(["--setup", str(setup_py), "--extras", "more"]) == 1
    out, err = capsys.readouterr()
    assert "2 of 4 requirements not met: surely-not-installed-dinoscale-pkg, torch" in err
    assert "MISSING" in out and "pytest" in out
    with pytest.raises(SystemExit):
        check_requirements.main(["--setup", str(setup_py), "--extras", "nope"])
