"""The ``fastmlp`` command (train / evaluate / info), in-process and as an installed script."""
from __future__ import annotations

import os
import subprocess
import sys

import fastmlp as fm
from fastmlp.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastmlp {fm.__version__}\n")
    assert "build: " in out and "cpu: yes" in out
    assert ("cuda: yes" in out) == fm.backends()["cuda"]
    if not fm.backends()["cuda"]:
        assert fm.backends()["cuda_reason"] in out


def test_train_save_evaluate(tmp_path, capsys):
    """A short run of `fastmlp train` on the real Fashion-MNIST files, then `evaluate`
    on the saved model: the same test accuracy, printed by both."""
    path = tmp_path / "model.safetensors"
    rc = main(["train", "--epochs", "2", "--limit", "6000", "--device", "cpu", "--save",
               str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("fastmlp train: fashion-mnist 784-128-10 Adam(lr=0.001")
    assert "6000 samples (0.1 held out for validation)" in lines[0]
    epochs = [l for l in lines if l.startswith("Epoch ")]
    assert len(epochs) == 2 and all("val_accuracy" in l and "time" in l for l in epochs)
    test_line = [l for l in lines if l.startswith("test loss")][0]
    acc = float(test_line.split("test accuracy ")[1])
    assert acc > 0.75, out  # 5400 images x 2 epochs: measured 0.81
    assert path.is_file()

    assert main(["evaluate", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {acc:.4f}" in out

    model = fm.load_model(path)
    assert [w.shape for w in model.get_weights()] == [(784, 128), (128,), (128, 10), (10,)]
    assert model.optimizer.iterations == 2 * 169  # ceil(5400 / 32) steps per epoch


def test_train_options(tmp_path, capsys):
    rc = main(["train", "--epochs", "1", "--limit", "600", "--hidden", "32", "16",
               "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--batch-size", "50",
               "--validation-split", "0", "--device", "cpu", "--verbose", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "784-32-16-10 SGD(lr=0.1, momentum=0.9" in out and "held out" not in out
    assert not [l for l in out.splitlines() if l.startswith("Epoch ")]


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmlp train: error: fashion-mnist: the four files")
    assert str(tmp_path) in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    assert main(["evaluate", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    # `python -m fastmlp` and the installed `fastmlp` script are the same command
    r = subprocess.run([sys.executable, "-m", "fastmlp", "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == f"fastmlp {fm.__version__}"
    script = os.path.join(os.path.dirname(sys.executable), "fastmlp")
    assert os.path.isfile(script), f"the console script is not installed at {script}"
    r = subprocess.run([script, "info"], capture_output=True, text=True, check=True)
    assert "cpu: yes" in r.stdout


def test_train_with_the_layer_flags(tmp_path, capsys):
    """--activation gelu --batchnorm --dropout: Dense -> BatchNormalization -> Activation
    -> Dropout per hidden layer; the saved model holds those layers and reloads. 6000
    images x 2 epochs: measured test accuracy 0.80; bound 0.7."""
    path = tmp_path / "layers.safetensors"
    rc = main(["train", "--epochs", "2", "--limit", "6000", "--device", "cpu",
               "--activation", "gelu", "--batchnorm", "--dropout", "0.2", "--save", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "784-128-10 (gelu, BatchNormalization, Dropout(0.2))" in out.splitlines()[0]
    acc = float([l for l in out.splitlines() if l.startswith("test loss")][0]
                .split("test accuracy ")[1])
    assert acc > 0.7, out
    model = fm.load_model(path)
    assert [type(l).__name__ for l in model.layers] == [
        "Dense", "BatchNormalization", "Activation", "Dropout", "Dense"]
    assert model.layers[2].activation == "gelu" and model.layers[3].rate == 0.2


def test_adversarial_train_evaluate_and_explain(tmp_path, capsys):
    """`train --adversarial pgd`, then `evaluate --adversarial` (robust accuracy, the
    same number train printed) and `explain` (a PNG of attribution heat maps)."""
    path = tmp_path / "robust.safetensors"
    rc = main(["train", "--epochs", "1", "--limit", "3000", "--device", "cpu", "--verbose", "0",
               "--adversarial", "pgd", "--eps", "0.1", "--attack-steps", "3", "--save",
               str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "adversarial training: PGD(eps=0.1, alpha=0.0833333" in out and "steps=3" in out
    robust = [l for l in out.splitlines() if l.startswith("robust test loss")][0]
    acc = float(robust.split("robust test accuracy ")[1].split()[0])
    assert 0.2 < acc < 0.9, out
    rc = main(["evaluate", str(path), "--device", "cpu", "--adversarial", "fgsm", "--eps",
               "0.1"])
    out = capsys.readouterr().out
    assert rc == 0 and "robust test accuracy" in out and "FGSM(eps=0.1" in out, out
    png = tmp_path / "fig.png"
    rc = main(["explain", str(path), "--device", "cpu", "--index", "0", "5", "9", "--method",
               "integrated_gradients", "--steps", "16", "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert png.read_bytes()[:4] == b"\x89PNG" and f"-> {png}" in out
    assert main(["explain", str(path), "--index", "10000"]) == 2
    assert "--index 10000 is not a test image" in capsys.readouterr().err
