"""Story and dialogue templates for the pretraining text.

What this module holds:

- ``PEOPLE_STORIES``: short stories with a cause and an effect about one or two people of the demo
  world. Slots: ``{A}``/``{B}`` names, ``{Ap}``/``{Bp}`` pronouns, ``{A_job}``, ``{A_hometown}``,
  ``{A_hobby}``, ``{A_food}``, ``{A_pet}``, ``{A_cl}`` (the pet's classifier) (same for B), ``{season}``, and facts about A's or B's home city (``{B_sight}``, ``{B_dish}``). Every
  slot is filled from the person's real attributes, so stories restate the world's facts in context.
- ``ANIMAL_STORIES``: fables about animals, filled from the animal table (``{X}`` and its
  ``{X_food}``, ``{X_habitat}``, ``{X_feature}``).
- ``DIALOGUES``: plain-text conversations between people of the world ("A：...\\nB：..."). Their
  question wording is deliberately different from the SFT and eval question templates.
- ``EVERYDAY_STORIES``: fact-free cause-and-effect stories for variety.

Nothing here may mention illnesses or symptoms: medical knowledge is reserved for the LoRA set.
"""
from __future__ import annotations

PEOPLE_STORIES = (
    "{A}是一名{A_job}。一天早上，天下起了大雨，{A}出门时忘了带伞，衣服全淋湿了。回家后，{Ap}马上换了干衣服，"
    "还喝了一杯热水。从那以后，{A}每次出门前都会先看看天气预报。",
    "周末，{A}带着自己的{A_pet}去公园散步。公园里有很多人，{A_pet}高兴地跑来跑去。因为走了很久，{A}有点累了，"
    "就在长椅上坐下休息。太阳下山的时候，{Ap}才带着{A_pet}回家。",
    "{A}和{B}是好朋友。{A}的爱好是{A_hobby}，{B}的爱好是{B_hobby}。有一次，{B}邀请{A}一起{B_hobby}。{A}虽然不太擅长，"
    "但是玩得很开心。后来，{A}也常常和{B}一起{B_hobby}。",
    "{A}从{A_hometown}出发，坐火车去{B_hometown}看望老朋友{B}。{B}知道{A}最喜欢吃{A_food}，就提前准备好了{A_food}。"
    "{A}吃得很开心，一直说谢谢。",
    "{A}的生日到了。朋友们知道{Ap}最爱吃{A_food}，就一起准备了一桌{A_food}。{A}非常感动，说这是最开心的一个生日。",
    "有一天，{A}的{A_pet}不见了。{A}很着急，到处寻找。朋友{B}听说后，也赶来帮忙。最后，他们在院子的角落里找到了"
    "那{A_cl}{A_pet}。原来它只是躲起来睡着了。{A}非常感谢{B}。",
    "{A}是一名{A_job}，工作很忙。每天下班以后，{Ap}都会{A_hobby}放松一下。{Ap}说：“做自己喜欢的事，烦恼就都不见了。”",
    "每到{season}，{A}都会回{A_hometown}看望父母。妈妈知道{A}最爱吃{A_food}，总会提前准备好。一家人坐在一起，"
    "有说有笑，非常热闹。",
    "{A}第一次去{B_hometown}。{B}是{B_hometown}人，就带着{A}到处参观。他们一起去了{B_sight}，还尝了{B_dish}。"
    "{A}说：“{B_hometown}真是个好地方！”",
    "{A}小时候成绩一般，但是{Ap}非常努力。后来，{A}成为了一名{A_job}。{Ap}常对年轻人说：“只要坚持，就一定会有收获。”",
    "{A}和{B}约好周六一起去郊游。可是那天早上下起了大雨，他们只好改变计划，在家里看了一部电影。"
    "虽然没能出去玩，但两个人还是度过了愉快的一天。",
    "{A}的{A_pet}最近不爱吃东西。{A}很担心，就带它去了宠物店。店员说它没什么事，只是天气太热了。"
    "{A}回家后给它换了凉快的窝，过了几天，{A_pet}又活蹦乱跳了。",
    "{A}想学{B_hobby}，于是去请教{B}。{B}的爱好正是{B_hobby}。{B}耐心地教{A}，没过多久，{A}就学会了。",
    "{A}是一名{A_job}。有一次，{Ap}在路上看到一位老奶奶提着很重的东西，就主动上前帮忙。老奶奶笑着说："
    "“你真是个好心人。”{A}说：“这是我应该做的。”",
    "{A}养了一{A_cl}{A_pet}，{B}也养了一{B_cl}{B_pet}。周末，两个人带着各自的宠物在公园见面。"
    "{A}的{A_pet}和{B}的{B_pet}很快成了好朋友。",
    "{A}最近迷上了{A_hobby}。因为每天坚持练习，{Ap}进步得很快。朋友{B}看到后，也想跟着{A}一起学。",
    "下午，{A}在{A_hometown}的一家小店里吃{A_food}。老板问：“您好像经常来？”{A}笑着说：“因为我最喜欢吃{A_food}了。”",
    "有一天，{A}在工作中遇到了难题，想了很久也没有办法，于是打电话给{B}。{B}是一名{B_job}，给{A}出了一个好主意。"
    "问题解决了，{A}高兴地请{B}吃了一顿饭。",
    "{A}前一天晚上睡得太晚，第二天早上起晚了，差点迟到。从那天起，{A}每天晚上十点就上床睡觉，再也没有迟到过。",
    "{A}和{B}一起参加了运动会。{A}跑得很快，得了第一名。{B}虽然没有得奖，但也真心为{A}感到高兴。",
    "{season}的一个下午，{A}在家里{A_hobby}，{Ap}的{A_pet}安静地待在旁边。窗外的风轻轻吹着，{A}觉得这样的日子很舒服。",
    "{A}是{A_hometown}人，{B}是{B_hometown}人。两个人第一次见面时，互相介绍了自己的家乡。{A}说{A_hometown}最有名的是"
    "{A_sight}，{B}说{B_hometown}最有名的是{B_sight}。他们约好以后去对方的家乡看看。",
    "{A}的邻居是{B}。{B}是一名{B_job}，每天很早就出门。有一次{B}忘了锁门，{A}发现后帮{Bp}把门锁好了。"
    "{B}回来后，特地来感谢{A}。",
    "{A}在市场上看到了新鲜的{A_food}，想起这是自己最喜欢的食物，就买了很多。回家的路上遇到了{B}，{A}分了一些给{Bp}。",
    "{A}做{A_job}已经很多年了。刚开始的时候，{Ap}常常出错，但{Ap}每次都认真总结。慢慢地，{A}成了一名优秀的{A_job}。",
)

ANIMAL_STORIES = (
    "{X_habitat}里住着一只{X}。{X}最爱吃{X_food}。有一天，它找了很久也没找到{X_food}，饿得没有力气。"
    "后来，一位朋友告诉它另一个地方有很多{X_food}，{X}这才吃饱了肚子。",
    "一只小{X}迷路了，怎么也找不到回家的路。它问了很多动物，大家都热心地帮它指路。最后，小{X}终于回到了{X_habitat}。"
    "从那以后，它出门总是记得路。",
    "小朋友们去动物园参观。老师指着{X}说：“{X}的特点是{X_feature}。”大家一边看一边认真地听，还把这些知识记在了本子上。",
    "{X}和{Y}是好朋友。{X}爱吃{X_food}，{Y}爱吃{Y_food}。它们常常把自己的食物分给对方尝一尝。",
    "有一年冬天特别冷，{X}找不到{X_food}。它的朋友{Y}把自己存的食物分给了它。第二年春天，{X}也帮助了{Y}。"
    "它们明白了互相帮助的道理。",
    "在{X_habitat}，一只{X}正在晒太阳。这时，一只{Y}走了过来，好奇地问：“你平时都吃什么呀？”{X}回答：“我最爱吃{X_food}。”",
)

EVERYDAY_STORIES = (
    "小明早上起床后发现外面下雪了。他赶紧穿上厚衣服，跑到院子里和小伙伴一起堆雪人。因为玩得太开心，他连早饭都忘了吃。"
    "妈妈把他叫回家，让他先吃饭再出去玩。",
    "小红在路上捡到了一个钱包。她想：丢钱包的人一定很着急。于是她把钱包交给了警察叔叔。失主找回钱包后，特地来学校感谢小红。",
    "一天，小刚忘了给家里的花浇水。过了几天，花的叶子都变黄了。小刚很后悔，从那以后，他每天都会按时给花浇水，花又慢慢变绿了。",
    "天气预报说明天有大风。爸爸把阳台上的花盆都搬进了屋里。第二天果然刮起了大风，邻居家的花盆被吹倒了，我们家的花却好好的。",
    "小丽每天坚持读半个小时的书。一年以后，她认识的字越来越多，写作文也越来越好。老师在全班表扬了她。",
    "冬天的早上，湖面结了一层冰。小狗跑到冰上，滑了一跤，吓得赶紧跑回岸边。原来冰面非常滑，走在上面一定要小心。",
    "夏天的中午太阳很大，小华在外面玩了很久，觉得又热又渴。妈妈让他回家喝了一大杯凉白开，还叮嘱他中午不要在太阳底下玩。",
    "秋天到了，果园里的苹果熟了。爷爷带着孙子去摘苹果。孙子摘了满满一篮，高兴地说：“今年的苹果真甜！”",
    "小亮做作业时总是一边写一边玩，结果写了很久也没写完。后来他学会了先专心写完作业再玩，每天都能早早完成。",
    "春天，农民伯伯在田里播下了种子。经过夏天的阳光和雨水，秋天的时候，田里长满了金黄的稻子，大家都很高兴。",
)

DIALOGUES = (
    "{A}：你认识{C}吗？\n{B}：认识啊，{C}是一名{C_job}。\n{A}：{Cp}老家是哪儿的？\n{B}：{C}是{C_hometown}人。",
    "{A}：{B}，你平时喜欢做什么？\n{B}：我喜欢{B_hobby}。你呢？\n{A}：我最喜欢{A_hobby}。",
    "{A}：你家里养宠物了吗？\n{B}：养了，我养了一{B_cl}{B_pet}。\n{A}：真好，我养了一{A_cl}{A_pet}。",
    "{A}：今天中午吃什么？\n{B}：我想吃{B_food}，那是我最喜欢的。\n{A}：好啊，那就去吃{B_food}吧。",
    "{A}：听说你是{B_hometown}人？\n{B}：对，我的家乡是{B_hometown}。\n{A}：那里最有名的是{B_sight}吧？\n{B}：没错。",
    "{A}：{B}，你现在在哪儿上班？\n{B}：我是一名{B_job}。\n{A}：这份工作一定很有意思。",
    "{A}：{C}最近在忙什么？\n{B}：{Cp}还是在做{C_job}的工作，周末会去{C_hobby}。",
    "{A}：我想送{C}一份礼物，送什么好呢？\n{B}：{C}最爱吃{C_food}，平时喜欢{C_hobby}，你可以从这两样里挑。",
    "{A}：{C}养的是什么小动物来着？\n{B}：{C}养了一{C_cl}{C_pet}，可爱极了。",
    "{A}：{C}是做哪一行的？\n{B}：{C}是一名{C_job}。",
    "{A}：{C}是哪儿的人啊？\n{B}：{C}的家乡是{C_hometown}。",
    "{A}：{C}平常爱干点啥？\n{B}：{C}的爱好是{C_hobby}。",
    "{A}：{C}最爱吃啥？\n{B}：{C}最喜欢吃{C_food}。",
    "{A}：{C}家养了啥小动物？\n{B}：{C}养了一{C_cl}{C_pet}。",
    "{A}：周末一起去玩吧？\n{B}：好啊，不过我得先带我的{B_pet}散散步。\n{A}：没问题，带它一起去吧。",
)

# Season small talk in dialogues (filled from the season table).
SEASON_DIALOGUES = (
    "{A}：现在是{S}了吧？\n{B}：是啊，{S}的天气很{S_weather}。\n{A}：等{S}过去，就是{S_next}了。",
    "{A}：你最喜欢哪个季节？\n{B}：我最喜欢{S}，因为{S}的天气{S_weather}。",
)
