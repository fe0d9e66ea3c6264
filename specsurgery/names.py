"""Names a statement or an op may not take: ss.Model is a torch.nn.Module with
one submodule per statement (and one per op inside it), reached as attributes
(`model.hero_h.linear`), so a statement called `forward`, `training` or
`features` would meet an attribute of the module itself, and get_parameter,
functional_call and FSDP would find the attribute, not the statement.

The list is every attribute of an ss.Model and of a statement's module under
the pinned torch (tests/test_model.py checks it against the live classes);
it needs no torch, so the spec check (and the pre-commit hook) can use it.
"""
from __future__ import annotations

# torch.compile marks the modules it has compiled with the first name.
MODULE_ATTRIBUTES = frozenset({
    '___needs_generation_tag_patch',
    'T_destination', '__annotations__', '__call__', '__class__', '__delattr__', '__dict__',
    '__dir__', '__doc__', '__eq__', '__format__', '__ge__', '__getattr__', '__getattribute__',
    '__getstate__', '__gt__', '__hash__', '__init__', '__init_subclass__', '__le__', '__lt__',
    '__module__', '__ne__', '__new__', '__reduce__', '__reduce_ex__', '__repr__', '__setattr__',
    '__setstate__', '__sizeof__', '__str__', '__subclasshook__', '__weakref__', '_apply',
    '_backward_hooks', '_backward_pre_hooks', '_buffers', '_call_impl', '_compiled_call_impl',
    '_forward_hooks', '_forward_hooks_always_called', '_forward_hooks_with_kwargs',
    '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_get_backward_hooks',
    '_get_backward_pre_hooks', '_get_name', '_is_full_backward_hook', '_load_from_state_dict',
    '_load_state_dict_post_hooks', '_load_state_dict_pre_hooks',
    '_maybe_warn_non_full_backward_hook', '_modules', '_named_members',
    '_non_persistent_buffers_set', '_parameters', '_register_load_state_dict_pre_hook',
    '_register_state_dict_hook', '_replicate_for_data_parallel', '_save_to_state_dict',
    '_slow_forward', '_ss_graph', '_ss_metadata', '_ss_nodes', '_ss_release', '_ss_state_by_scope',
    '_ss_state_by_statement', '_ss_step', '_state_dict_hooks', '_state_dict_pre_hooks', '_version',
    '_wrapped_call_impl', 'add_module', 'apply', 'bfloat16', 'buffers', 'call_super_init',
    'children', 'compile', 'cpu', 'cuda', 'double', 'dump_patches', 'eval', 'extra_repr',
    'features', 'featurise', 'float', 'forward', 'get_buffer', 'get_extra_state', 'get_parameter',
    'get_submodule', 'half', 'heads', 'initial_state', 'inputs', 'ipu', 'load_state_dict',
    'metadata', 'modules', 'mtia', 'name', 'named_buffers', 'named_children', 'named_modules',
    'named_parameters', 'parameters', 'register_backward_hook', 'register_buffer',
    'register_forward_hook', 'register_forward_pre_hook', 'register_full_backward_hook',
    'register_full_backward_pre_hook', 'register_load_state_dict_post_hook',
    'register_load_state_dict_pre_hook', 'register_module', 'register_parameter',
    'register_state_dict_post_hook', 'register_state_dict_pre_hook', 'requires_grad_', 'save',
    'set_extra_state', 'set_submodule', 'share_memory', 'spec', 'state_dict', 'to', 'to_empty',
    'train', 'training', 'type', 'xpu', 'zero_grad'
})
