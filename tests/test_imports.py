import subprocess
import sys


def test_import_touches_no_cuda_only_code():
    code = ("import sys, torch, hiar, hiar.config, hiar.flow, hiar.models; "
            "assert not any(m.startswith('flash_attn') for m in sys.modules), 'flash_attn imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
