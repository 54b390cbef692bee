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


def test_a_checkpoint_with_more_cuda_rng_states_than_visible_gpus_resumes(monkeypatch):
    import checkpoint

    def set_cuda_state(new_state, device='cuda'):  # torch's own check: the device index must exist
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= torch.cuda.device_count():
            raise IndexError(f'no CUDA device {index}')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda.random, 'set_rng_state', set_cuda_state)

    saved = checkpoint.capture_rng_state()
    assert 'cuda' not in saved  # redundant: every step reseeds every device
    expected = torch.rand(3)
    from_8_gpus = {**saved, 'cuda': [torch.zeros(16, dtype=torch.uint8)] * 8}  # an older 8-GPU checkpoint
    checkpoint.restore_rng_state(from_8_gpus)
    assert torch.equal(torch.rand(3), expected)
