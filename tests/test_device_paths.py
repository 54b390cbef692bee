"""CUDA and multi-rank code paths through their smallest CPU stand-ins (a GPU shows the rest:
``python -m tools.gpu_check``)."""
import torch

from engine import LossScaler


def test_fp16_resume_from_a_checkpoint_without_loss_scale_state_starts_at_the_initial_scale(capsys):
    scaler = LossScaler(enabled=True, device_type='cpu')  # fp16 loss scaling, as on CUDA
    scaler.load_state_dict({})  # what a bf16 / fp32 / CPU run saves
    assert scaler.state_dict()['scale'] == torch.amp.GradScaler('cpu').get_scale()
    assert 'no fp16 loss-scale state' in capsys.readouterr().out
    fp16_state = {**scaler.state_dict(), 'scale': 1024.0}
    scaler.load_state_dict(fp16_state)  # a real fp16 state still loads
    assert scaler.state_dict()['scale'] == 1024.0
