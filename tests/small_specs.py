"""Small spec texts that several test files change in their own ways."""

# One plain group with a category, an embedding, a hidden layer and a head:
# tests add a feature to it ("level"), remove "mana", widen the layer, and so on.
HERO_AGENT = """\
schema s {
  vocab heroes = [axe, bane]
  group hero {
    health: float
    mana: float
    hero_id: category(heroes)
  }
}

model agent(obs: s) {
  he = embed(obs.hero.hero_id, 4)
  h = relu(linear(concat(obs.hero, he), 8))
  out act = linear(h, 3)
}
"""

ADD_LEVEL = HERO_AGENT.replace("    mana: float\n", "    mana: float\n    level: int\n")
